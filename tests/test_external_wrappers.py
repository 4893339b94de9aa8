"""k-diffusion's external wrappers (OpenAIDenoiser, CompVisDenoiser, CompVisVDenoiser) and the
guided-diffusion / LDM schedules against the reference (foreign_gd_*.npz, foreign_sd*.npz).

The network is a stub returning the recorded ``den_model_out`` after checking it was called
at x c_in and the interpolated t, so the wrapper maths is checked on its own (fixtures
README "OpenAIDenoiser" and "Stable Diffusion U-Net: Wrappers").
"""

import jax
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
    with pytest.raises(ValueError, match="6 channels, expected 3 .* has_learned_sigmas=False"):
        W.OpenAIDenoiser(lambda x_in, t: swapped, ac, has_learned_sigmas=False)(x, sigma)


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


# --------------------------------------------------------------------------- classifier guidance

MEANS = np.array([[1.0, -0.5, 0.2], [-0.8, 0.4, 0.6], [0.1, 0.9, -1.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
STD = 0.4


def _mixture_classifier(x_in, t):
    """The exact noisy classifier of the mixture, in VP input space: logits_k = log w_k +
    log N(x; mu_k, (std^2 + sigma^2) I) with sigma = tan(t pi/2), x = x_in sqrt(sigma^2 + 1)."""
    sigma = W.atan_t_to_sigma(t)[:, None]  # [B, 1]
    x = x_in * jnp.sqrt(sigma**2 + 1)
    var = STD**2 + sigma**2
    d2 = jnp.sum((x[:, None, :] - MEANS[None]) ** 2, axis=-1)  # [B, K]
    return jnp.log(WEIGHTS) - d2 / (2 * var) - 1.5 * jnp.log(var)


def test_classifier_guidance_with_exact_classifier_is_the_class_denoiser():
    """D + sigma^2 grad_x log p(y | x; sigma) = D(x; sigma, y) (Tweedie), for scale 1."""
    from edm_jax import analytic
    from edm_jax.guidance import classifier_guidance

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 3)) * 2)
    sigma = jnp.asarray([0.05, 0.3, 1.0, 2.5, 7.0, 30.0])
    y = jnp.asarray([0, 1, 2, 2, 1, 0])
    uncond = analytic.mixture_denoiser(MEANS, WEIGHTS, STD)

    @jax.jit
    def guided(scale):  # one program for every scale
        den = classifier_guidance(
            uncond, _mixture_classifier, y, scale, sigma_to_t=W.atan_sigma_to_t
        )
        return den(x, sigma)

    expected = np.stack(
        [analytic.gaussian_denoiser(MEANS[k], STD)(x, sigma)[i] for i, k in enumerate(y)]
    )
    D1, D0, D3 = guided(1.0), guided(0.0), guided(3.0)
    np.testing.assert_allclose(D1, expected, rtol=2e-4, atol=2e-4)
    # scale 0 is the unguided denoiser; the guidance term is linear in the scale
    np.testing.assert_allclose(D0, uncond(x, sigma), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D3 - D0, 3 * (D1 - D0), rtol=1e-4, atol=1e-5)


def test_classifier_log_prob_gradient_closed_form():
    """Gaussian-class logits -|x_in - mu_k|^2 / 2: grad_x log p(y) = c_in (mu_y - E_p[mu])."""
    from edm_jax.guidance import classifier_log_prob

    rng = np.random.default_rng(1)
    x, sigma = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray([0.1, 0.8, 2.0, 9.0])
    y = jnp.asarray([2, 0, 1, 2])

    def classifier(x_in, t):
        return -0.5 * jnp.sum((x_in[:, None, :] - MEANS[None]) ** 2, axis=-1)

    log_prob = classifier_log_prob(classifier, y, sigma_to_t=lambda s: 10 * s)
    grad = jax.jit(jax.grad(lambda x_: jnp.sum(log_prob(x_, sigma))))(x)
    c_in = 1 / np.sqrt(np.asarray(sigma, np.float64) ** 2 + 1)[:, None]
    x_in = np.asarray(x, np.float64) * c_in
    logits = -0.5 * ((x_in[:, None, :] - MEANS[None]) ** 2).sum(-1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = c_in * (MEANS[np.asarray(y)] - p @ MEANS)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_classifier_guided_model_checks():
    from edm_jax.guidance import ClassifierGuidedModel

    model = W.SamplingModel(lambda x, sigma, **kw: x, (4, 4, 3), label_dim=5)
    with pytest.raises(ValueError, match="the model has 5 classes, the classifier 3"):
        ClassifierGuidedModel(model, lambda x, t, p: x, 3, 1.0, sigma_to_t=W.atan_sigma_to_t)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        ClassifierGuidedModel(model, lambda x, t, p: x, 1, 1.0, sigma_to_t=W.atan_sigma_to_t)
    with pytest.raises(ValueError, match="guidance scale must be finite"):
        ClassifierGuidedModel(model, lambda x, t, p: x, 5, np.inf, sigma_to_t=W.atan_sigma_to_t)
    guided = ClassifierGuidedModel(model, lambda x, t, p: x, 5, 1.0, sigma_to_t=W.atan_sigma_to_t)
    assert guided.label_dim == 5 and guided.image_shape == (4, 4, 3)
