"""The hash generator's dropout, and the XLA:CPU flag setting (its rules, not its speed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import hashrng, xla_cpu


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_rate_scale_and_keying(rate):
    x = jnp.full((64, 16, 16, 8), 3.0)
    y = np.asarray(hashrng.dropout(jax.random.key(0), x, rate))
    kept = y != 0
    n = kept.size
    # kept fraction within 5 binomial standard deviations of 1 - rate
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[kept], 3.0 / (1 - rate), rtol=1e-6)  # inverted dropout
    again = np.asarray(hashrng.dropout(jax.random.key(0), x, rate))
    other = np.asarray(hashrng.dropout(jax.random.key(1), x, rate))
    np.testing.assert_array_equal(y, again)
    assert (other != y).mean() > 0.5 * 2 * rate * (1 - rate)  # a different mask


def test_dropout_masks_are_uncorrelated_across_positions():
    """Neighbouring elements (and channels) are kept independently."""
    y = np.asarray(hashrng.dropout(jax.random.key(3), jnp.ones((256, 256)), 0.5)) != 0
    a, b = y[:, :-1].ravel(), y[:, 1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    a, b = y[:-1].ravel(), y[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_dropout_rate_zero_and_bad_rate():
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(hashrng.dropout(jax.random.key(0), x, 0.0), x)
    with pytest.raises(ValueError, match="dropout rate must be in"):
        hashrng.dropout(jax.random.key(0), x, 1.0)


FLAG = f"{xla_cpu.YNN_FLAG}={xla_cpu.YNN_FUSIONS}"


def test_xla_cpu_flag_added_where_safe():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.configure(env, release=(0, 10), started=False)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert not xla_cpu.configure(env, release=(0, 10), started=False)  # once only
    empty: dict[str, str] = {}
    assert xla_cpu.configure(empty, release=(0, 10), started=False)
    assert empty["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize(
    "env, release, started",
    [
        ({"XLA_FLAGS": f"{xla_cpu.YNN_FLAG}="}, (0, 10), False),  # the user's own choice
        ({xla_cpu.OPT_OUT: "0"}, (0, 10), False),  # opted out
        ({}, (0, 11), False),  # a jaxlib the flag was not checked on: it could abort XLA
        ({}, (0, 10), True),  # a backend already runs: too late, leave it alone
    ],
)
def test_xla_cpu_flag_left_alone(env, release, started):
    before = dict(env)
    assert not xla_cpu.configure(env, release=release, started=started)
    assert env == before


def test_xla_cpu_flag_left_alone_when_jaxlib_version_unknown(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_release", lambda: None)
    env: dict[str, str] = {}
    assert not xla_cpu.configure(env, started=False)
    assert env == {}


def test_erfinv_matches_xla_erf_inv():
    """Giles' polynomials as written here equal XLA's erf_inv to float32 rounding, tails included."""
    u = jnp.concatenate([jnp.linspace(-1 + 2**-23, 1 - 2**-23, 200_001),
                         1 - jnp.logspace(-7, -1, 50)])  # fmt: skip
    ours, ref = np.asarray(hashrng.erfinv(u)), np.asarray(jax.lax.erf_inv(u))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6)


def test_normal_from_bits_moments():
    z = np.asarray(
        hashrng.normal_from_bits(hashrng.bits(jax.random.key(0), (1_000_000,))), np.float64
    )
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / n)  # Gaussian kurtosis
    assert abs(np.mean(np.abs(z) > 3) - 2.6998e-3) < 5 * np.sqrt(2.7e-3 / n)  # the tails
