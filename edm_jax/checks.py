"""Checks of user input shared by the whole package: one clear error naming the bad value.

``check_choice`` (a name out of a registry, with a "did you mean"), ``check_positive``
(a concrete scalar > 0; traced values pass) and ``check_steps`` (a step count).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

__all__ = ["check_choice", "check_positive", "check_steps", "concrete", "did_you_mean"]


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
