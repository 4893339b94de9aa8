"""Exact denoisers satisfy Tweedie's formula D = x + sigma^2 grad log p_sigma; the ODE map is exact."""

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import analytic

MEANS = np.array([[1.0, -0.5, 0.2], [-1.0, 0.4, 0.0], [0.3, 0.3, -1.2]])
WEIGHTS = np.array([0.5, 0.3, 0.2])


def test_mixture_denoiser_is_tweedie(x64):
    x = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64) * 2
    for sigma in (0.05, 0.7, 5.0):
        score = jax.grad(
            lambda v: analytic.mixture_log_density(v, sigma, MEANS, WEIGHTS, 0.4).sum()
        )(x)
        D = analytic.mixture_denoiser(MEANS, WEIGHTS, 0.4)(x, sigma)
        np.testing.assert_allclose(D, x + sigma**2 * score, rtol=1e-10, atol=1e-12)


def test_gaussian_is_one_component_mixture(x64):
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    sigma = jnp.array([0.1, 1.0, 2.0, 30.0])
    g = analytic.gaussian_denoiser(MEANS[0], 0.4)(x, sigma)
    m = analytic.mixture_denoiser(MEANS[:1], [1.0], 0.4)(x, sigma)
    np.testing.assert_allclose(g, m, rtol=1e-12)


def test_pf_ode_solution_solves_the_ode(x64):
    """d x / d sigma = (x - D(x; sigma)) / sigma along the closed-form path."""
    x0 = jax.random.normal(jax.random.key(2), (2, 3), jnp.float64) * 10
    path = lambda s: analytic.gaussian_pf_ode_solution(x0, 10.0, s, MEANS[0], 0.4)  # noqa: E731
    for s in (0.3, 2.0, 9.0):
        dx = jax.jacfwd(path)(s)
        rhs = (path(s) - analytic.gaussian_denoiser(MEANS[0], 0.4)(path(s), s)) / s
        np.testing.assert_allclose(dx, rhs, rtol=1e-10)
    np.testing.assert_allclose(path(10.0), x0)


def test_sample_mixture_moments(x64):
    s = analytic.sample_mixture(jax.random.key(3), 100_000, MEANS, WEIGHTS, 0.4)
    np.testing.assert_allclose(np.mean(s, 0), WEIGHTS @ MEANS, atol=0.02)
