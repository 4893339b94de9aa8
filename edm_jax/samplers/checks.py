"""Checks of concrete sampler inputs: sigma grids, sigma ranges, scalars and seeds.

Traced values (inside jit) are not checked: the checks run on concrete numbers only,
before any compute, and raise a ValueError naming the bad value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["MAX_SEED", "check_range", "check_scalar", "check_seeds", "check_sigmas"]

MAX_SEED = 2**32 - 1  # seeds are folded into keys as uint32


def _concrete(value: Any) -> np.ndarray | None:
    """value as a numpy array, or None when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_sigmas(sigmas: Any) -> None:
    """A sampler's sigma grid: 1-D, finite, >= 0, non-increasing, starting above 0.

    A grid need not end in 0: k-diffusion users split one grid over several calls.
    """
    s = _concrete(sigmas)
    if s is None:
        return
    if s.ndim != 1 or s.size < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of >= 2 values ending in 0, got shape {s.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if np.any(s < 0):
        raise ValueError(f"sigmas must be >= 0, got {s.tolist()}")
    if np.any(np.diff(s) > 0):
        i = int(np.argmax(np.diff(s) > 0))
        raise ValueError(
            f"sigmas must be non-increasing (noise to data), but sigmas[{i}]={s[i]} < "
            f"sigmas[{i + 1}]={s[i + 1]}"
        )
    if s[0] <= 0:
        raise ValueError(
            f"sigmas must start above 0 (all zero: nothing to denoise), got {s.tolist()}"
        )


def check_scalar(name: str, value: Any, *, positive: bool = False, allow_zero: bool = True) -> None:
    """A concrete scalar option is a finite number (and > 0 / >= 0 when asked)."""
    v = _concrete(value)
    if v is None:
        return
    if v.ndim != 0 or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not (v > 0 or (allow_zero and v == 0)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_range(sigma_min: Any, sigma_max: Any) -> None:
    """0 < sigma_min < sigma_max < inf (concrete values only)."""
    check_scalar("sigma_min", sigma_min, positive=True, allow_zero=False)
    check_scalar("sigma_max", sigma_max, positive=True, allow_zero=False)
    lo, hi = _concrete(sigma_min), _concrete(sigma_max)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(
            f"sigma_min={float(lo)} must be below sigma_max={float(hi)} (sampling runs from "
            "sigma_max down to sigma_min)"
        )


def check_seeds(seeds: Sequence[int]) -> None:
    """Seeds are integers in [0, 2**32): larger ones would alias smaller ones."""
    for seed in seeds:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seeds must be integers, got {seed!r}")
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed} is out of range: seeds must be in [0, 2**32 - 1]")
