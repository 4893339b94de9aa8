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
    SamplingModel,
    VDenoiser,
    X0Denoiser,
    atan_t_to_sigma,
    beta_schedule,
    diffusers_alphas_cumprod,
    diffusers_timesteps,
    rescale_zero_terminal_snr,
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


# --------------------------------------------------------------------------- diffusers-style

# alphas_cumprod at t = 0, 499, 999 (998 when rescaled) computed with torch 2.13 from
# diffusers' formulas (torch.linspace float32 betas, torch.cumprod), independently of ours.
TORCH_AC = {
    ("linear", 1e-4, 0.02): [0.9998999834060669, 0.07858723402023315, 4.035830352222547e-05],
    ("scaled_linear", 0.00085, 0.012): [0.9991499781608582, 0.27766942977905273,
                                        0.00466009508818388],
}  # fmt: skip
TORCH_AC_ZERO_SNR = {
    ("linear", 1e-4, 0.02): [0.9998999834060669, 0.0760287269949913, 4.2132741739919766e-09],
    ("scaled_linear", 0.00085, 0.012): [0.9991499781608582, 0.24235899746418,
                                        1.9679629303936963e-07],
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(TORCH_AC))
def test_diffusers_alphas_cumprod_match_torch(key):
    name, beta_start, beta_end = key
    ac = diffusers_alphas_cumprod(name, 1000, beta_start, beta_end)
    assert ac.dtype == np.float32 and ac.shape == (1000,)
    np.testing.assert_array_equal(ac[[0, 499, 999]], np.float32(TORCH_AC[key]))  # bit for bit
    zsnr = diffusers_alphas_cumprod(name, 1000, beta_start, beta_end, rescale_betas_zero_snr=True)
    np.testing.assert_allclose(zsnr[[0, 499, 998]], TORCH_AC_ZERO_SNR[key], rtol=2e-6)
    assert zsnr[-1] == 2.0**-24  # diffusers: close to 0 so the first sigma is finite


def test_cosine_and_bad_schedule():
    betas = beta_schedule("squaredcos_cap_v2", 1000)
    abar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal
    np.testing.assert_allclose(np.cumprod(1 - betas.astype(np.float64))[:-1],
                               abar(np.arange(1, 1000) / 1000) / abar(0), rtol=1e-5)  # fmt: skip
    assert betas[-1] == np.float32(0.999)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'; valid"):
        beta_schedule("cosine")


def test_diffusers_timestep_spacing():
    """Stable Diffusion's leading spacing with steps_offset=1 gives 901, 801, ..., 1."""
    np.testing.assert_array_equal(
        diffusers_timesteps(10, 1000, "leading", 1), np.arange(901, 0, -100)
    )
    np.testing.assert_array_equal(
        diffusers_timesteps(10, 1000, "trailing"), np.arange(999, 0, -100)
    )
    np.testing.assert_allclose(diffusers_timesteps(4, 1000, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(diffusers_timesteps(3, 1000, "trailing"), [999, 666, 332])
    with pytest.raises(ValueError, match="unknown timestep_spacing 'lead'; valid"):
        diffusers_timesteps(10, 1000, "lead")
    ac = diffusers_alphas_cumprod()
    sig = DiscreteSchedule(ac).diffusers_sigmas(10, "leading", 1)
    table = np.sqrt((1 - ac.astype(np.float64)) / ac)
    np.testing.assert_allclose(sig[:-1], table[901::-100], rtol=1e-6)
    assert sig[-1] == 0 and sig.shape == (11,)


@pytest.mark.parametrize("key", sorted(TORCH_AC))
def test_zero_terminal_snr_table_is_accepted(key):
    name = key[0]
    betas = rescale_zero_terminal_snr(beta_schedule(name, 1000, *key[1:]))
    ac = np.cumprod(1 - betas.astype(np.float64))
    assert ac[-1] < 1e-12  # alphas_cumprod ends in 0: sigma would be infinite
    ac[-1] = 0.0
    sched = DiscreteSchedule(ac)
    end = min(2.0**-24, ac[-2] / 2)  # diffusers' 2^-24 unless the table is below it already
    assert end == 2.0**-24 if name == "scaled_linear" else end < 2.0**-24
    np.testing.assert_allclose(sched.sigma_max, np.sqrt((1 - end) / end), rtol=1e-6)
    assert np.all(np.diff(np.asarray(sched.sigmas)) > 0)
    zsnr = diffusers_alphas_cumprod(*key[:1], 1000, *key[1:], rescale_betas_zero_snr=True)
    np.testing.assert_allclose(DiscreteSchedule(zsnr).sigma_max, sched.sigma_max, rtol=1e-4)


def test_sample_respects_wrapper_range_and_does_not_clip():
    """A wrapped discrete eps model of data far outside [-1, 1] (a latent) through sample()."""
    from edm_jax import api

    mean = np.full(4, 3.0)  # latents: values past 1
    exact = analytic.gaussian_denoiser(mean.reshape(2, 2, 1), 0.5)
    sched = DiscreteSchedule(diffusers_alphas_cumprod())

    def eps_model(x_in, t):
        s = sched.t_to_sigma(t)[:, None, None, None]
        x = x_in * jnp.sqrt(1 + s**2)
        return (x - exact(x, s[:, 0, 0, 0])) / s

    model = SamplingModel(DiscreteEpsDDPMDenoiser(eps_model, sched.alphas_cumprod), (2, 2, 1))
    lo, hi = api._sigma_range(model, 0.002, 80.0)
    assert (lo, hi) == (float(sched.sigma_min), float(sched.sigma_max)) and hi < 15
    out = api.sample(jax.random.key(0), None, model, num_samples=16, sampler="dpmpp_2m",
                     num_steps=12)  # fmt: skip
    assert abs(out.mean() - 3.0) < 0.3 and out.max() > 2.0  # not clipped to 1
