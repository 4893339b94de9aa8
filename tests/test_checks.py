"""edm_jax.checks: one rule per notion, shared by the samplers, the schedules, the API and
sample.py (the same input gets the same answer everywhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import api, checks, schedules
from edm_jax.samplers import SAMPLERS


def test_range_is_strict_and_finite():
    checks.check_range(0.002, 80.0)
    checks.check_range(np.float32(1e-3), jnp.asarray(1e3))
    for lo, hi, match in [
        (1.0, 1.0, "sigma_min=1.0 must be below sigma_max=1.0"),
        (80.0, 0.002, "sigma_min=80.0 must be below sigma_max=0.002"),
        (0.0, 1.0, "sigma_min must be > 0, got 0.0"),
        (0.1, float("inf"), "sigma_max must be a finite number"),
        (float("nan"), 1.0, "sigma_min must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            checks.check_range(lo, hi)
    with pytest.raises(ValueError, match="min_value=2.0 must be below max_value=2.0"):
        checks.check_range(2.0, 2.0, ("min_value", "max_value"))


def test_range_rule_is_the_same_in_schedules_and_samplers():
    """lo == hi was allowed by the schedules and refused by the samplers: now refused by both."""
    for call in (
        lambda: schedules.karras(4, 1.0, 1.0),
        lambda: schedules.loguniform(jax.random.key(0), (2,), 1.0, 1.0),
        lambda: SAMPLERS["dpm_fast"](lambda x, s: x, np.zeros((1, 2, 2, 1)), 1.0, 1.0, 3),
    ):
        with pytest.raises(ValueError, match="must be below"):
            call()
    assert np.allclose(schedules.karras(2, 1.0, 4.0), [4.0, 1.0, 0.0])


def test_traced_values_pass():
    """Inside jit only concrete numbers are checked."""
    f = jax.jit(lambda lo, hi: checks.check_range(lo, hi) or lo)
    assert float(f(2.0, 1.0)) == 2.0


def test_seeds_are_parsed_once():
    got = checks.check_seeds([3, 0, 2**32 - 1])
    assert got.dtype == np.int64 and got.tolist() == [3, 0, 2**32 - 1]
    assert checks.check_seeds(np.arange(2, dtype=np.uint32)).tolist() == [0, 1]
    for bad, match in [
        ([0, 2**32], "seed 4294967296 is out of range"),
        ([-1], "seeds must be a non-empty 1-D list of ints >= 0"),
        ([], "seeds must be a non-empty"),
        ([[1, 2]], "seeds must be a non-empty 1-D"),
        ([1.0], "list of ints"),
        ([1, True], "list of ints"),
    ]:
        with pytest.raises(ValueError, match=match):
            checks.check_seeds(bad)
    assert api._resolve_seeds(None, [5, 7]).tolist() == [5, 7]  # the API parses through it
    with pytest.raises(ValueError, match="seeds must be a non-empty 1-D list of ints >= 0"):
        api._resolve_seeds(None, [1, True])


def test_scalar_and_positive():
    checks.check_scalar("rho", 7.0, positive=True, allow_zero=False)
    checks.check_positive("scale", 0.0, allow_zero=True)
    with pytest.raises(ValueError, match="rho must be > 0, got 0.0"):
        checks.check_scalar("rho", 0.0, positive=True, allow_zero=False)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        checks.check_scalar("cfg_scale", np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="scale must be > 0, got nan"):
        checks.check_positive("scale", float("nan"))
