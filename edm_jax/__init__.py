"""edm_jax: the EDM design space (Karras et al. 2022) in JAX/Flax.

Light modules are imported here; ``edm_jax.nets``, ``edm_jax.data``, ``edm_jax.train`` and
``edm_jax.likelihood`` (diffrax) load on first access.
"""

import importlib

from edm_jax import xla_cpu

xla_cpu.configure()  # before any computation: XLA reads XLA_FLAGS when a backend starts

from edm_jax import analytic, guidance, losses, precond, samplers, schedules, types, wrappers
from edm_jax.api import load, sample
from edm_jax.losses import LOSSES, make_loss
from edm_jax.precond import PRECONDS, get_precond, make_denoiser
from edm_jax.samplers import SAMPLERS, get_sampler
from edm_jax.schedules import SCHEDULES, get_sigmas

_LAZY = ("nets", "data", "train", "likelihood")


def __getattr__(name: str):
    """Import the heavier subpackages (and ``log_likelihood``) on first use."""
    if name in _LAZY:
        return importlib.import_module(f"edm_jax.{name}")
    if name == "log_likelihood":
        return importlib.import_module("edm_jax.likelihood").log_likelihood
    if name == "text_to_image":  # Stable Diffusion (edm_jax.sd)
        return importlib.import_module("edm_jax.sd").text_to_image
    raise AttributeError(f"module 'edm_jax' has no attribute {name!r}")


__all__ = [
    "LOSSES",
    "PRECONDS",
    "SAMPLERS",
    "SCHEDULES",
    "analytic",
    "get_precond",
    "get_sampler",
    "get_sigmas",
    "guidance",
    "likelihood",
    "load",
    "log_likelihood",
    "losses",
    "make_denoiser",
    "make_loss",
    "precond",
    "sample",
    "samplers",
    "schedules",
    "text_to_image",
    "types",
    "wrappers",
]
__version__ = "0.1.0"
