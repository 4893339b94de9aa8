"""Checks of user input, one rule per notion, for the whole package: one clear error naming
the bad value, raised before any compute.

``check_choice`` (a name out of a registry, with a "did you mean"), ``check_positive``
(a concrete scalar > 0), ``check_scalar`` (a finite option), ``check_range`` (a range
0 < lo < hi < inf: sampling's and the schedules' sigma ranges), ``check_steps`` (a step count),
``check_sigmas`` (a sampler's sigma grid) and ``check_seeds`` (the seeds of a batch).
Traced values (inside jit) pass: only concrete numbers are checked.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "MAX_SEED",
    "check_choice",
    "check_positive",
    "check_range",
    "check_scalar",
    "check_seeds",
    "check_sigmas",
    "check_steps",
    "concrete",
    "did_you_mean",
]

MAX_SEED = 2**32 - 1  # seeds are folded into keys as uint32


def concrete(value: Any) -> float | None:
    """Python float of a concrete scalar, None if traced."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def did_you_mean(value: Any, valid: Iterable) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    names = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _listed(valid: Iterable) -> list:
    """The valid choices in a stable order (sorted when they sort)."""
    items = list(valid)
    try:
        return sorted(items)
    except TypeError:
        return items


def check_choice(name: str, value: Any, valid: Iterable) -> None:
    """Raise ValueError "unknown <name> <value> (did you mean ..); valid: [...]" unless valid."""
    valid = list(valid)
    if value not in valid:
        hint = did_you_mean(value, valid) if isinstance(value, str) else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; valid: {_listed(valid)}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise ValueError if a concrete `value` is not > 0 (or >= 0); traced values pass."""
    v = concrete(value)
    if v is None:
        return
    if not (v >= 0 if allow_zero else v > 0) or math.isnan(v):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_steps(n: Any) -> None:
    """Raise ValueError unless `n` is an int >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of steps) must be an int >= 1, got {n!r}")


def _concrete_array(value: Any) -> np.ndarray | None:
    """value as a float64 numpy array, or None when it is traced."""
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
    s = _concrete_array(sigmas)
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
    v = _concrete_array(value)
    if v is None:
        return
    if v.ndim != 0 or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not (v > 0 or (allow_zero and v == 0)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_range(lo: Any, hi: Any, names: tuple[str, str] = ("sigma_min", "sigma_max")) -> None:
    """0 < lo < hi < inf (concrete values only): every sigma range of the package."""
    check_scalar(names[0], lo, positive=True, allow_zero=False)
    check_scalar(names[1], hi, positive=True, allow_zero=False)
    a, b = _concrete_array(lo), _concrete_array(hi)
    if a is not None and b is not None and not a < b:
        raise ValueError(
            f"{names[0]}={float(a)} must be below {names[1]}={float(b)} (the range runs "
            f"from {names[1]} down to {names[0]})"
        )


def check_seeds(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Seeds: a non-empty 1-D list of ints in [0, 2**32) (larger ones would alias smaller
    ones as uint32 keys); returned as int64."""
    arr = np.asarray(seeds)
    items = [] if arr.ndim != 1 or isinstance(seeds, np.ndarray) else list(seeds)
    not_int = any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in items)
    if arr.ndim != 1 or arr.size == 0 or not_int or arr.dtype.kind not in "iu" or np.any(arr < 0):
        raise ValueError(f"seeds must be a non-empty 1-D list of ints >= 0, got {seeds!r}")
    if np.any(arr > MAX_SEED):
        raise ValueError(f"seed {int(arr.max())} is out of range: seeds must be in [0, {MAX_SEED}]")
    return arr.astype(np.int64)
