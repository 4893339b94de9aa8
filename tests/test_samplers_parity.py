"""Every sampler case of ../shared/fixtures/samplers.json reproduced (k-diffusion and NVlabs/edm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic, samplers

KD_CASES = [
    "euler", "heun", "dpm_2", "lms", "lms_order2", "dpmpp_2m", "euler_ancestral",
    "euler_ancestral_eta05", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive",
]  # fmt: skip
EDM_CASES = [
    "edm_heun", "ablation_euler_vp_vp_vp", "ablation_heun_edm_vp_vp",
    "ablation_heun_edm_linear_none", "ablation_heun_ve_ve_none", "ablation_euler_iddpm_linear_none",
]  # fmt: skip


def _pseudo_noise(fx, shape, dtype):
    """The fixture's deterministic stand-in for Gaussian noise."""
    a, b, c = (fx["pseudo_noise"][k] for k in "abc")
    idx = jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)

    def sample(sigma, sigma_next):
        return jnp.sqrt(2.0) * jnp.sin(a * idx + b * jnp.log(sigma) + c * jnp.log(sigma_next))

    return sample


def _run_kd(fx, case, dtype):
    spec = fx["kdiffusion"][case]
    m, sa = fx["mixture"], fx["schedule_args"]
    denoise = analytic.mixture_denoiser(m["means"], m["weights"], m["std"])
    x = jnp.asarray(fx["x_init"], dtype)
    kwargs = dict(spec["kwargs"])
    if spec.get("uses_noise_sampler"):
        kwargs["noise_sampler"] = _pseudo_noise(fx, x.shape, dtype)
    info = samplers.sampler_info(spec["sampler"])
    fn = info.fn
    if info.takes == "grid":
        return fn(denoise, x, jnp.asarray(fx["sigmas"], dtype), **kwargs)
    if info.takes_n:  # dpm_fast, jitted: its two tail steps are outside the scan
        run = jax.jit(lambda x: fn(denoise, x, sa["sigma_min"], sa["sigma_max"], sa["n"], **kwargs))
        return run(x)
    return fn(denoise, x, sa["sigma_min"], sa["sigma_max"], return_info=True, **kwargs)[0]


def _run_edm(fx, case, dtype):
    spec = fx["edm"][case]
    m = fx["mixture"]
    denoise = analytic.mixture_denoiser(m["means"], m["weights"], m["std"])
    latents = jnp.asarray(fx["latents_for_edm"], dtype)
    kwargs = dict(spec["kwargs"])
    if case == "edm_heun":
        return samplers.edm_sampler(denoise, latents, **kwargs)
    return samplers.ablation_sampler(denoise, latents, **kwargs)


# k-diffusion's DPM-Solver keeps its times in float32 and NVlabs/edm computes iDDPM's
# alpha_bar in float32; the JAX samplers do the same, so float64 runs agree to 1e-8 too.
RTOL64, RTOL32 = 1e-8, 1e-4


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("case", KD_CASES)
def test_kdiffusion_float64(case, sampler_fixture, x64):
    out = _run_kd(sampler_fixture, case, jnp.float64)
    assert _rel(out, sampler_fixture["kdiffusion"][case]["out"]) < RTOL64


@pytest.mark.parametrize("case", EDM_CASES)
def test_edm_float64(case, sampler_fixture, x64):
    out = _run_edm(sampler_fixture, case, jnp.float64)
    assert _rel(out, sampler_fixture["edm"][case]["out"]) < RTOL64


@pytest.mark.parametrize("case", KD_CASES + EDM_CASES)
def test_float32(case, sampler_fixture):
    group = "kdiffusion" if case in sampler_fixture["kdiffusion"] else "edm"
    run = _run_kd if group == "kdiffusion" else _run_edm
    out = run(sampler_fixture, case, jnp.float32)
    assert np.asarray(out).dtype == np.float32
    assert _rel(out, sampler_fixture[group][case]["out"]) < RTOL32


def test_dpm_adaptive_step_count_float32_matches_float64(sampler_fixture):
    m, sa = sampler_fixture["mixture"], sampler_fixture["schedule_args"]
    denoise = analytic.mixture_denoiser(m["means"], m["weights"], m["std"])
    x = jnp.asarray(sampler_fixture["x_init"], jnp.float32)
    _, info32 = samplers.sample_dpm_adaptive(
        denoise, x, sa["sigma_min"], sa["sigma_max"], rtol=0.01, atol=0.001, return_info=True
    )
    jax.config.update("jax_enable_x64", True)
    try:
        x64_ = jnp.asarray(sampler_fixture["x_init"], jnp.float64)
        _, info64 = samplers.sample_dpm_adaptive(
            denoise, x64_, sa["sigma_min"], sa["sigma_max"], rtol=0.01, atol=0.001, return_info=True
        )
    finally:
        jax.config.update("jax_enable_x64", False)
    assert int(info32["n_accept"]) == int(info64["n_accept"]) > 0
