"""Samplers on Gaussian data: convergence orders, stochastic moments, invariances, jit, grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic, samplers, schedules

MEAN, STD = 0.3, 0.5


def _ode_error(name, n, grid="geometric", **opts):
    """Max error at sigma = 0.1 of an n-step run from sigma = 10 vs the exact ODE."""
    x = 10.0 * jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    if grid == "geometric":
        sigmas = jnp.exp(jnp.linspace(jnp.log(10.0), jnp.log(0.1), n + 1))
    else:
        sigmas = jnp.linspace(10.0, 0.1, n + 1)
    out = samplers.SAMPLERS[name](analytic.gaussian_denoiser(MEAN, STD), x, sigmas, **opts)
    exact = analytic.gaussian_pf_ode_solution(x, 10.0, 0.1, MEAN, STD)
    return float(jnp.max(jnp.abs(out - exact)))


ORDERS = [
    ("euler", {}, 0.85, 1.3),
    ("heun", {}, 1.8, 2.5),
    ("dpm_2", {}, 1.8, 2.5),
    ("dpmpp_2m", {}, 1.8, 2.6),
    ("lms", {"order": 4}, 3.0, 5.0),
    # iPNDM's fixed Adams-Bashforth coefficients assume equal steps: order 4 on a uniform
    # grid, 2 on a geometric one (the step ratio enters the local error at h^3)
    ("ipndm", {"grid": "uniform"}, 3.3, 5.0),
    ("ipndm", {}, 1.8, 2.5),
    ("unipc", {}, 3.5, 7.0),
]


@pytest.mark.parametrize("name, opts, lo, hi", ORDERS)
def test_convergence_order(name, opts, lo, hi, x64):
    e1, e2 = _ode_error(name, 32, **opts), _ode_error(name, 64, **opts)
    slope = np.log2(e1 / e2)
    assert lo < slope < hi, (name, e1, e2, slope)


# Samplers that add noise with their default options (the registry says which).
STOCHASTIC = sorted(n for n, info in samplers.SAMPLER_INFO.items() if info.stochastic)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_moments(name):
    n = 2000
    steps = 128 if name == "euler_ancestral" else 32  # first order: its bias shrinks as 1/steps
    sigmas = schedules.karras(steps, 0.002, 80.0)
    x = 80.0 * jax.random.normal(jax.random.key(1), (n, 1))
    out = np.asarray(
        samplers.SAMPLERS[name](
            analytic.gaussian_denoiser(MEAN, STD), x, sigmas, rng=jax.random.key(2)
        )
    ).ravel()
    assert abs(out.mean() - MEAN) < 5 * STD / np.sqrt(n)
    assert abs(out.std() - STD) < 0.05 * STD + 5 * STD / np.sqrt(2 * n)


@pytest.mark.parametrize("name", ["euler_ancestral", "heun_sde"])
def test_batch_invariance(name):
    x = 80.0 * jax.random.normal(jax.random.key(3), (64, 4, 4, 1))
    sigmas = schedules.karras(10, 0.002, 80.0)
    denoise = analytic.gaussian_denoiser(MEAN, STD)
    big = samplers.SAMPLERS[name](denoise, x, sigmas, rng=jax.random.key(4))
    one = samplers.SAMPLERS[name](denoise, x[:1], sigmas, rng=jax.random.key(4))
    np.testing.assert_allclose(big[:1], one, rtol=1e-5, atol=1e-6)
    assert not np.allclose(big[0], big[1])


def test_brownian_noise_is_one_brownian_path():
    """Increments are N(0, 1), disjoint ones independent, and all read one path W(sigma)."""
    n = 4000
    ns = jax.jit(samplers.brownian_noise_sampler(jax.random.key(6), jnp.zeros((n, 1)), 0.002, 80.0))
    tol = 5 / np.sqrt(n)
    for a, b in [(4.0, 1.0), (80.0, 79.0), (0.0021, 0.002), (0.5, 0.4999)]:
        z = np.asarray(ns(a, b)).ravel()
        assert abs(z.mean()) < tol and abs(z.var() - 1) < 2 * np.sqrt(2) * tol, (a, b)
    whole, upper, lower = (np.asarray(ns(a, b)).ravel() for a, b in [(4, 1), (4, 2), (2, 1)])
    assert abs(np.corrcoef(upper, lower)[0, 1]) < tol
    # W(4) - W(1) = (W(4) - W(2)) + (W(2) - W(1)) sample by sample: the same path at any steps
    np.testing.assert_allclose(whole * np.sqrt(3), upper * np.sqrt(2) + lower, atol=2e-5)
    # keyed per sample: the first sample's path is the same in a batch of 1
    alone = samplers.brownian_noise_sampler(jax.random.key(6), jnp.zeros((1, 1)), 0.002, 80.0)
    np.testing.assert_allclose(jax.jit(alone)(4.0, 1.0)[0], whole[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["heun", "lms", "dpmpp_2m", "unipc", "euler_ancestral"])
def test_jit_with_traced_sigmas(name):
    x = 80.0 * jax.random.normal(jax.random.key(6), (2, 3))
    denoise = analytic.gaussian_denoiser(MEAN, STD)
    fn = samplers.SAMPLERS[name]
    run = lambda s: fn(denoise, x, s, rng=jax.random.key(7))  # noqa: E731
    sigmas = schedules.karras(8, 0.002, 80.0)
    np.testing.assert_allclose(jax.jit(run)(sigmas), run(sigmas), rtol=1e-5, atol=1e-5)
    moved = jax.jit(lambda lo: run(schedules.karras(8, lo, 80.0)))(0.01)
    assert np.all(np.isfinite(moved))


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "euler_ancestral", "dpmpp_3m_sde", "unipc"])
def test_grad_through_sampler(name, x64):
    """d(sum of samples)/d(mean of the data) matches a central finite difference."""
    x = 20.0 * jax.random.normal(jax.random.key(8), (3, 2), jnp.float64)
    sigmas = schedules.karras(6, 0.01, 20.0)

    @jax.jit
    def total(mean):
        out = samplers.SAMPLERS[name](
            analytic.gaussian_denoiser(mean, STD), x, sigmas, rng=jax.random.key(9)
        )
        return jnp.sum(out)

    g = jax.jit(jax.grad(total))(0.3)
    fd = (total(0.3 + 1e-5) - total(0.3 - 1e-5)) / 2e-5
    assert np.isfinite(float(g))
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_edm_sampler_churn_matches_heun_churn(x64):
    """EDM Algorithm 2 (edm_sampler) is k-diffusion's Heun with churn on the EDM grid."""
    latents = jax.random.normal(jax.random.key(11), (3, 2), jnp.float64)
    denoise = analytic.gaussian_denoiser(MEAN, STD)
    noise = lambda s, s_hat: jnp.sin(jnp.arange(6.0).reshape(3, 2) + jnp.log(s * s_hat))  # noqa: E731
    churn = {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    edm = samplers.edm_sampler(denoise, latents, num_steps=8, noise_sampler=noise, **churn)
    sigmas = schedules.karras(8, 0.002, 80.0)
    heun = samplers.sample_heun(
        denoise, latents * 80.0, sigmas, noise_sampler=noise,
        **{k.lower().replace("s_min", "s_tmin").replace("s_max", "s_tmax"): v
           for k, v in churn.items()},
    )  # fmt: skip
    np.testing.assert_allclose(edm, heun, rtol=1e-9, atol=1e-9)  # rounding, amplified by churn
    assert not np.allclose(edm, samplers.edm_sampler(denoise, latents, num_steps=8))


def test_trajectory_outputs():
    x = 80.0 * jax.random.normal(jax.random.key(10), (2, 3))
    sigmas = schedules.karras(5, 0.002, 80.0)
    out, traj = samplers.sample_heun(
        analytic.gaussian_denoiser(MEAN, STD), x, sigmas, return_trajectory=True
    )
    assert traj["x"].shape == (5, 2, 3) and traj["denoised"].shape == (5, 2, 3)
    np.testing.assert_allclose(traj["x"][0], x)


def test_registry_and_errors():
    assert {"heun_sde", "dpm++", "ipndm", "unipc", "dpm_adaptive"} <= set(samplers.SAMPLERS)
    assert samplers.SAMPLERS["dpm++"] is samplers.sample_dpmpp_2m
    with pytest.raises(ValueError, match="'heunn'.*euler"):
        samplers.get_sampler("heunn")
    denoise = analytic.gaussian_denoiser(MEAN, STD)
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="rng"):
        samplers.sample_euler_ancestral(denoise, x, schedules.karras(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="solver_type"):
        samplers.sample_dpmpp_2m_sde(denoise, x, schedules.karras(3, 0.1, 1.0), solver_type="rk4")
    with pytest.raises(ValueError, match="discretization"):
        samplers.ablation_sampler(denoise, x, discretization="cosine")
    with pytest.raises(ValueError, match="sigma_min"):
        samplers.sample_dpm_fast(denoise, x, 0.0, 1.0, 5)
