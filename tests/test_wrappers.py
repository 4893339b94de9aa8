"""eps-/v-/x0-model wrappers reproduce the exact Gaussian denoiser they were built from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic
from edm_jax.wrappers import (
    DiscreteEpsDDPMDenoiser,
    DiscreteSchedule,
    DiscreteVDDPMDenoiser,
    EpsDenoiser,
    VDenoiser,
    X0Denoiser,
    atan_t_to_sigma,
)

MEAN = np.array([0.3, -0.2, 0.5, 0.1])
STD = 0.6
D_exact = analytic.gaussian_denoiser(MEAN, STD)
# Linear-beta DDPM schedule (Ho et al. 2020), T = 1000.
ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def _table_t_to_sigma(t):
    """Independent numpy map t -> sigma of the DDPM table (log-linear between entries)."""
    log_sigmas = np.log(np.sqrt((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD))
    return jnp.exp(jnp.interp(t, np.arange(1000.0), log_sigmas))


def _eps_model(t_to_sigma):
    """eps(x_in, t) of Gaussian data, written by hand: x = x_in sqrt(1+s^2), eps = (x - D)/s."""

    def model(x_in, t):
        s = t_to_sigma(t)[:, None]
        x = x_in * jnp.sqrt(1 + s**2)
        return (x - D_exact(x, s[:, 0])) / s

    return model


def _v_model(t_to_sigma):
    """v = alpha eps - sigma_vp x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s alpha."""

    def model(x_in, t):
        s = t_to_sigma(t)[:, None]
        alpha = 1 / jnp.sqrt(1 + s**2)
        x = x_in / alpha
        D = D_exact(x, s[:, 0])
        return alpha * (x - D) / s - s * alpha * D

    return model


@pytest.fixture
def xs():
    sigma = jnp.array([0.01, 0.1, 0.7, 1.5, 10.0, 60.0])
    x = MEAN + jax.random.normal(jax.random.key(1), (6, 4)) * jnp.sqrt(STD**2 + sigma[:, None] ** 2)
    return x, sigma


@pytest.mark.parametrize("cls,make", [(EpsDenoiser, _eps_model), (VDenoiser, _v_model)])
def test_continuous_wrappers_reproduce_denoiser(xs, cls, make):
    x, sigma = xs
    wrapped = cls(make(atan_t_to_sigma))
    np.testing.assert_allclose(wrapped(x, sigma), D_exact(x, sigma), rtol=2e-4, atol=2e-4)


def test_x0_wrapper_and_kwargs_reach_the_model(xs):
    x, sigma = xs

    def model(x_in, t, *, shift):
        s = atan_t_to_sigma(t)
        return D_exact(x_in * jnp.sqrt(1 + s[:, None] ** 2), s) + shift

    np.testing.assert_allclose(
        X0Denoiser(model)(x, sigma, shift=1.0), D_exact(x, sigma) + 1.0, rtol=1e-4
    )


@pytest.mark.parametrize(
    "cls,make", [(DiscreteEpsDDPMDenoiser, _eps_model), (DiscreteVDDPMDenoiser, _v_model)]
)
def test_discrete_wrappers_reproduce_denoiser(x64, cls, make):
    sched = DiscreteSchedule(ALPHAS_CUMPROD)
    sigma_tab = sched.sigmas
    # Sigmas on the table (exact t) and between entries (fractional t).
    sigma = jnp.concatenate([sigma_tab[jnp.array([0, 10, 500, 999])], jnp.array([0.05, 0.9, 3.3])])
    x = MEAN + jax.random.normal(jax.random.key(2), (7, 4), jnp.float64)
    wrapped = cls(make(_table_t_to_sigma), ALPHAS_CUMPROD)
    np.testing.assert_allclose(wrapped(x, sigma), D_exact(x, sigma), rtol=1e-10, atol=1e-10)
    # Quantized: the model sees the nearest table index, so D is exact at table sigmas.
    quant = cls(make(_table_t_to_sigma), ALPHAS_CUMPROD, quantize=True)
    np.testing.assert_allclose(quant(x[:4], sigma[:4]), D_exact(x[:4], sigma[:4]), rtol=1e-10)


def test_discrete_schedule_maps(x64):
    sched = DiscreteSchedule(ALPHAS_CUMPROD)
    t = jnp.array([0.0, 3.0, 3.25, 998.5, 999.0])
    np.testing.assert_allclose(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-9)
    np.testing.assert_allclose(sched.t_to_sigma(t), _table_t_to_sigma(t), rtol=1e-12)
    assert sched.sigma_to_t(sched.t_to_sigma(3.4), quantize=True) == 3
    # Out of range clamps to the ends, as k-diffusion.
    np.testing.assert_allclose(sched.sigma_to_t(jnp.array([1e-6, 1e6])), [0.0, 999.0])
    full = sched.get_sigmas()
    assert full.shape == (1001,) and full[-1] == 0 and full[0] == sched.sigma_max
    s10 = sched.get_sigmas(10)
    assert s10.shape == (11,) and float(s10[-1]) == 0.0
    np.testing.assert_allclose(s10[:-1], _table_t_to_sigma(np.linspace(999, 0, 10)), rtol=1e-12)
    assert np.all(np.diff(np.asarray(s10[:-1])) < 0)


def test_discrete_bad_input():
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteSchedule(ALPHAS_CUMPROD[::-1])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteSchedule(np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match="number of sigmas"):
        DiscreteSchedule(ALPHAS_CUMPROD).get_sigmas(0)
