"""Helpers shared by the training tests: the tiny config and a persistent compile cache."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**updates):
    """configs/tiny.py with dotted-key updates, e.g. tiny_config(**{'train.fsdp': True})."""
    from edm_jax.train import load_config

    config = load_config(str(ROOT / "configs" / "tiny.py"))
    for key, value in updates.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@contextlib.contextmanager
def compile_cache(path: Path):
    """Use a persistent XLA cache so identical programs compile once per test session."""
    from jax._src import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, 0), strict=True):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for n, v in previous.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def tree_equal(a, b) -> bool:
    """Exact equality of two pytrees of arrays (same structure)."""
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def tree_max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb, strict=True)
    )


class SampleableStandIn:
    """The types.SampleableModel values test stand-in models share: continuous sigma,
    unbounded, pixel outputs, no encoder, zero-label CFG, a deterministic denoiser."""

    sigma_min = 0.0
    sigma_max = float("inf")
    clip_output = True
    encoder = None
    null_label = "zero"
    takes_key = False

    def round_sigma(self, sigma):
        return jax.numpy.asarray(sigma)
