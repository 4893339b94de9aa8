"""The public surface: importing edm_jax stays light; the shared types live in one module."""

import subprocess
import sys


def test_import_is_light_and_likelihood_lazy():
    code = (
        "import sys, edm_jax\n"
        "heavy = [m for m in ('diffrax', 'edm_jax.likelihood', 'edm_jax.train', 'optax')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(edm_jax.log_likelihood) and 'diffrax' in sys.modules\n"
        "from edm_jax.types import Denoiser, NoiseSampler\n"
        "from edm_jax.samplers import core\n"
        "assert core.Denoiser is Denoiser\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
