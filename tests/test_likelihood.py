"""log_likelihood against the exact log-density of Gaussian and Gaussian-mixture data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic
from edm_jax.likelihood import log_likelihood

MEANS = np.array([[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0], [0.5, 1.0, -0.5, -1.0]])
WEIGHTS = np.array([0.2, 0.5, 0.3])
STD = 0.3
SIGMA_MIN, SIGMA_MAX = 0.01, 80.0


def _mixture_batch(n, seed=0):
    x = analytic.sample_mixture(jax.random.key(seed), n, MEANS, WEIGHTS, STD)
    return x.reshape(n, 2, 2, 1)  # NHWC, d = 4


def test_gaussian_rademacher_is_exact(x64):
    """Isotropic Gaussian data: the Jacobian is a multiple of I, so one Rademacher probe is exact."""
    mean, std = np.array([0.5, -0.5, 0.2]), 0.7
    x = mean + std * jax.random.normal(jax.random.key(3), (8, 3), jnp.float64)

    def denoise(params, x, sigma):  # the mean is a traced parameter, as a network's weights
        return analytic.gaussian_denoiser(params["mean"], std)(x, sigma)

    out = log_likelihood(
        denoise, x, SIGMA_MIN, SIGMA_MAX, params={"mean": jnp.asarray(mean)},
        rng=jax.random.key(0), rtol=1e-7, atol=1e-7,
        prior_log_density=lambda z: analytic.gaussian_log_density(z, SIGMA_MAX, mean, std),
    )  # fmt: skip
    ref = analytic.gaussian_log_density(x, SIGMA_MIN, mean, std)
    np.testing.assert_allclose(out["nats"], ref, atol=1e-5)
    np.testing.assert_allclose(out["bpd"], -out["nats"] / (3 * math.log(2)) + 7.0, rtol=1e-12)


def test_mixture_exact_divergence(x64):
    """Exact trace + the true prior p_{sigma_max}: only ODE error is left."""
    x = _mixture_batch(8)
    out = log_likelihood(
        analytic.mixture_denoiser(MEANS, WEIGHTS, STD), x, SIGMA_MIN, SIGMA_MAX,
        method="exact", rtol=1e-7, atol=1e-7, num_levels=None,
        prior_log_density=lambda z: analytic.mixture_log_density(z, SIGMA_MAX, MEANS, WEIGHTS, STD),
    )  # fmt: skip
    ref = analytic.mixture_log_density(x, SIGMA_MIN, MEANS, WEIGHTS, STD)
    np.testing.assert_allclose(out["nats"], ref, atol=1e-5)
    np.testing.assert_allclose(out["bpd"], -ref / (4 * math.log(2)), atol=1e-5)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_mixture_hutchinson_within_estimator_error(probe):
    """Unbiased: the mean error over a batch is within 4 standard errors of 0 (float32)."""
    n = 32
    x = _mixture_batch(n, seed=1)
    denoise = analytic.mixture_denoiser(MEANS, WEIGHTS, STD)
    kw = dict(rng=jax.random.key(7), num_probes=4, probe=probe, rtol=1e-5, atol=1e-5)
    out = log_likelihood(denoise, x, SIGMA_MIN, SIGMA_MAX, **kw)
    err = np.asarray(out["nats"] - analytic.mixture_log_density(x, SIGMA_MIN, MEANS, WEIGHTS, STD))
    assert np.all(np.isfinite(err)) and err.std() > 0
    # Plus the default N(0, sigma_max^2) prior's bias, about |E x| / sigma_max ~ 0.02 nats.
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(n) + 0.05
    # Same probes, same answer: deterministic given rng (and the compiled program is reused).
    np.testing.assert_array_equal(
        log_likelihood(denoise, x, SIGMA_MIN, SIGMA_MAX, **kw)["nats"], out["nats"]
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="trace"), "unknown divergence method 'trace'"),
        (dict(probe="uniform"), "unknown probe 'uniform'"),
        (dict(num_probes=0), "num_probes"),
        (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
        (dict(rng=None), "needs rng"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rng=jax.random.key(0)) | kwargs
    den = analytic.gaussian_denoiser(np.zeros(4), 1.0)
    with pytest.raises(ValueError, match=match):
        log_likelihood(den, jnp.zeros((2, 4)), **args)
