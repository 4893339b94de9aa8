"""k-diffusion's external wrappers (OpenAIDenoiser, CompVisDenoiser, CompVisVDenoiser) and the
guided-diffusion / LDM schedules against the reference (foreign_gd_*.npz, foreign_sd*.npz).

The network is a stub returning the recorded ``den_model_out`` after checking it was called
at x c_in and the interpolated t, so the wrapper maths is checked on its own (fixtures
README "OpenAIDenoiser" and "Stable Diffusion U-Net: Wrappers").
"""

import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import wrappers as W

TOL = 3e-5  # denoiser outputs (fixtures README)


def maxrel(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def nhwc(a: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _stub(z, cond_key: str | None):
    """A model returning den_model_out [B,H,W,C] once its inputs are checked."""
    calls = []

    def model(x_in, t, **cond):
        np.testing.assert_allclose(x_in, nhwc(z["den_x"] * z["den_c_in"][:, None, None, None]),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
        assert maxrel(t, z["den_t"]) < 2e-5
        if cond_key is not None:
            np.testing.assert_array_equal(next(iter(cond.values())), z[cond_key])
        calls.append(cond)
        return nhwc(z["den_model_out"])

    return model, calls


GD_CASES = {  # file: (schedule, learned sigma, class-conditional)
    "legacy": ("linear", True, False),
    "newattn": ("cosine", True, True),
    "halfmult": ("linear", False, False),
}


@pytest.mark.parametrize("case", sorted(GD_CASES))
def test_openai_denoiser_matches_k_diffusion(case, fixtures_dir):
    z = np.load(fixtures_dir / f"foreign_gd_{case}.npz")
    schedule, learned, conditional = GD_CASES[case]
    ac = W.guided_diffusion_alphas_cumprod(schedule)
    np.testing.assert_array_equal(ac, z["alphas_cumprod"])  # float64, bit for bit
    model, calls = _stub(z, "den_y" if conditional else None)
    den = W.OpenAIDenoiser(model, ac, has_learned_sigmas=learned)
    assert maxrel(den.sigmas, z["kd_sigmas"]) <= 1e-7
    assert den.sigmas.dtype == jnp.float32
    cond = {"y": jnp.asarray(z["den_y"])} if conditional else {}
    D = den(nhwc(z["den_x"]), jnp.asarray(z["den_sigma"]), **cond)
    assert len(calls) == 1
    assert maxrel(np.asarray(D).transpose(0, 3, 1, 2), z["den_out"]) < TOL
    # sigma outside [sigma_min, sigma_max] clamps t to 0 / T-1, as the reference
    np.testing.assert_array_equal(den.sigma_to_t(jnp.asarray([1e-4, 1e5])), [0, 999])
    np.testing.assert_array_equal(
        W.OpenAIDenoiser(model, ac).sigma_to_t(jnp.asarray(z["den_sigma"]), quantize=True),
        z["den_t_quantized"],
    )


def test_learned_sigma_half_is_discarded(fixtures_dir):
    z = np.load(fixtures_dir / "foreign_gd_legacy.npz")
    ac = W.guided_diffusion_alphas_cumprod("linear")
    x, sigma = nhwc(z["den_x"]), jnp.asarray(z["den_sigma"])
    eps = nhwc(z["den_model_out"])
    swapped = jnp.concatenate([eps[..., 3:], eps[..., :3]], axis=-1)
    D = W.OpenAIDenoiser(lambda x_in, t: swapped, ac)(x, sigma)
    assert maxrel(np.asarray(D).transpose(0, 3, 1, 2), z["den_out"]) > 0.1  # the other half


@pytest.mark.parametrize("case", ["sd1", "sd2"])
def test_compvis_denoisers_match_k_diffusion(case, fixtures_dir):
    z = np.load(fixtures_dir / f"foreign_{case}.npz")
    np.testing.assert_array_equal(W.ldm_alphas_cumprod(), z["alphas_cumprod"])
    np.testing.assert_array_equal(
        W.ldm_alphas_cumprod().astype(np.float32), z["alphas_cumprod_f32"]
    )
    np.testing.assert_allclose(W.ldm_betas(), z["betas"], rtol=1e-10)
    model, calls = _stub(z, "den_context")
    wrapper = W.CompVisDenoiser if case == "sd1" else W.CompVisVDenoiser
    den = wrapper(model, z["alphas_cumprod_f32"])
    assert maxrel(den.sigmas, z["kd_sigmas"]) <= 1e-7
    D = den(nhwc(z["den_x"]), jnp.asarray(z["den_sigma"]), context=jnp.asarray(z["den_context"]))
    assert len(calls) == 1 and list(calls[0]) == ["context"]
    assert maxrel(np.asarray(D).transpose(0, 3, 1, 2), z["den_out"]) < TOL
    np.testing.assert_allclose(den.sigma_min, 0.02916753, rtol=1e-6)
    np.testing.assert_allclose(den.sigma_max, 14.6146, rtol=1e-5)


def test_released_schedules(fixtures_dir):
    gd = np.load(fixtures_dir / "foreign_gd_released.npz")
    for name in W.GUIDED_DIFFUSION_SCHEDULES:
        ac = W.guided_diffusion_alphas_cumprod(name)
        assert ac.dtype == np.float64
        np.testing.assert_array_equal(ac, gd[f"alphas_cumprod_{name}"])
        np.testing.assert_allclose(W.guided_diffusion_betas(name), gd[f"betas_{name}"], rtol=1e-9)
        den = W.OpenAIDenoiser(lambda x, t: x, ac)
        assert maxrel(den.sigmas, gd[f"kd_sigmas_{name}"]) <= 1e-7
    np.testing.assert_allclose(float(W.OpenAIDenoiser(None, ac).sigma_max), 20291, rtol=1e-4)
    sd = np.load(fixtures_dir / "foreign_sd_released.npz")
    np.testing.assert_array_equal(W.ldm_alphas_cumprod(), sd["alphas_cumprod"])
    den = W.CompVisDenoiser(None, W.ldm_alphas_cumprod())  # a float64 table is cast first
    assert maxrel(den.sigmas, sd["kd_sigmas"]) <= 1e-7


def test_classifier_fixture_time_and_scaling(fixtures_dir):
    """kd_t and kd_c_in of the classifier-guidance fixture: OpenAIDenoiser's sigma -> t."""
    z = np.load(fixtures_dir / "foreign_gd_classifier.npz")
    den = W.OpenAIDenoiser(None, z["alphas_cumprod"])
    assert maxrel(den.sigma_to_t(jnp.asarray(z["kd_sigma"])), z["kd_t"]) < 2e-5
    np.testing.assert_allclose(1 / np.sqrt(z["kd_sigma"] ** 2 + 1), z["kd_c_in"], rtol=1e-6)


def test_bad_schedule_names():
    with pytest.raises(ValueError, match="unknown guided-diffusion schedule 'cos'; valid"):
        W.guided_diffusion_betas("cos")
    with pytest.raises(ValueError, match="num_timesteps must be an int >= 2"):
        W.ldm_betas(1)
