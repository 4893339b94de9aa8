"""Guidance transforms against exact analytic denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic
from edm_jax.guidance import autoguidance, cfg, gradient_guidance

MEANS = np.array([[1.0, -1.0, 0.5], [-1.0, 0.5, 1.0]])
WEIGHTS = np.array([0.3, 0.7])
STD = 0.4


def _class_denoiser():
    """Exact class-conditional mixture denoiser; a zero one-hot label means unconditional."""
    uncond = analytic.mixture_denoiser(MEANS, WEIGHTS, STD)
    per_class = [analytic.gaussian_denoiser(m, STD) for m in MEANS]
    calls = []

    def denoise(x, sigma, labels=None):
        calls.append(x.shape[0])
        if labels is None:
            return uncond(x, sigma)
        cond = sum(labels[:, k, None] * per_class[k](x, sigma) for k in range(len(MEANS)))
        is_null = jnp.sum(labels, axis=-1, keepdims=True) == 0
        return jnp.where(is_null, uncond(x, sigma), cond)

    return denoise, uncond, per_class, calls


@pytest.fixture
def batch():
    x = jax.random.normal(jax.random.key(0), (6, 3)) * 2.0
    sigma = jnp.array([0.1, 0.5, 1.0, 2.0, 5.0, 20.0])
    labels = jax.nn.one_hot(jnp.array([0, 1, 0, 1, 1, 0]), 2)
    return x, sigma, labels


def test_cfg_scale_one_is_conditional_zero_is_unconditional(batch):
    x, sigma, labels = batch
    denoise, uncond, per_class, calls = _class_denoiser()
    cond_ref = jnp.where(labels[:, :1] == 1, per_class[0](x, sigma), per_class[1](x, sigma))
    np.testing.assert_allclose(cfg(denoise, 1.0, labels)(x, sigma), cond_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cfg(denoise, 0.0, labels)(x, sigma), uncond(x, sigma), atol=1e-6)
    # D_w = D_u + w (D_c - D_u) and one network call per evaluation on the doubled batch.
    calls.clear()
    out = cfg(denoise, 2.5, labels)(x, sigma)
    ref = uncond(x, sigma) + 2.5 * (cond_ref - uncond(x, sigma))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [12]


def test_cfg_jits_with_traced_scale_and_scalar_sigma(batch):
    x, _, labels = batch
    denoise, uncond, _, _ = _class_denoiser()
    fn = jax.jit(lambda x, s, w: cfg(denoise, w, labels)(x, s))
    np.testing.assert_allclose(fn(x, 0.7, 0.0), uncond(x, 0.7), atol=1e-6)


def test_cfg_bad_input(batch):
    x, _, labels = batch
    denoise = _class_denoiser()[0]
    with pytest.raises(ValueError, match="uncond_labels shape"):
        cfg(denoise, 2.0, labels, uncond_labels=jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match="finite"):
        cfg(denoise, float("nan"), labels)


def test_autoguidance_interpolates_between_guide_and_main(batch):
    x, sigma, _ = batch
    main = analytic.mixture_denoiser(MEANS, WEIGHTS, STD)
    weak = analytic.gaussian_denoiser(MEANS.mean(0), 1.0)
    np.testing.assert_allclose(autoguidance(main, weak, 1.0)(x, sigma), main(x, sigma), atol=1e-6)
    np.testing.assert_allclose(autoguidance(main, weak, 0.0)(x, sigma), weak(x, sigma), atol=1e-6)
    ref = weak(x, sigma) + 2.0 * (main(x, sigma) - weak(x, sigma))
    np.testing.assert_allclose(autoguidance(main, weak, 2.0)(x, sigma), ref, rtol=1e-5, atol=1e-5)


def test_gradient_guidance_exact_chain_rule(batch):
    """Gaussian data: D = a x + b with a = s^2/(s^2+sigma^2); log_prob = -|D - c|^2 / 2."""
    x, sigma, _ = batch
    mean, target, scale = MEANS[0], jnp.array([0.3, 0.2, -0.4]), 1.5
    denoise = analytic.gaussian_denoiser(mean, STD)

    def log_prob(d, sigma):
        return -0.5 * jnp.sum((d - target) ** 2, axis=-1)

    D = denoise(x, sigma)
    s2 = sigma[:, None] ** 2
    a = STD**2 / (STD**2 + s2)
    direct = gradient_guidance(denoise, log_prob, scale, through_denoiser=False)(x, sigma)
    np.testing.assert_allclose(direct, D + scale * s2 * (target - D), rtol=1e-5, atol=1e-5)
    chained = jax.jit(gradient_guidance(denoise, log_prob, scale))(x, sigma)
    np.testing.assert_allclose(chained, D + scale * s2 * a * (target - D), rtol=1e-5, atol=1e-5)


def test_gradient_guidance_with_exact_classifier_gives_conditional_denoiser(batch):
    """Classifier guidance with the exact noisy classifier, scale 1, is the class denoiser.

    grad_x log p(y=k | x; sigma) = grad log r_k(x) depends on x itself, so the guidance term
    sigma^2 grad log r_k is taken through the identity 'denoiser' and added to the mixture's D.
    """
    x, sigma, _ = batch
    uncond = analytic.mixture_denoiser(MEANS, WEIGHTS, STD)
    k = 1

    def log_post(x_, sigma):  # log r_k(x; sigma)
        log_p = jnp.stack(
            [
                analytic.gaussian_log_density(x_, sigma, m, STD) + np.log(w)
                for m, w in zip(MEANS, WEIGHTS, strict=True)
            ]
        )
        return log_p[k] - jax.nn.logsumexp(log_p, axis=0)

    identity = lambda x_, sigma: x_  # noqa: E731
    grad_term = gradient_guidance(identity, log_post, 1.0)(x, sigma) - x
    guided = uncond(x, sigma) + grad_term
    expected = analytic.gaussian_denoiser(MEANS[k], STD)(x, sigma)
    np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-4)


def test_cfg_unbatched_uses_labels_none(batch):
    x, sigma, labels = batch
    denoise, uncond, per_class, calls = _class_denoiser()
    cond_ref = jnp.where(labels[:, :1] == 1, per_class[0](x, sigma), per_class[1](x, sigma))
    calls.clear()
    out = cfg(denoise, 2.0, labels, batched=False)(x, sigma)
    np.testing.assert_allclose(out, 2.0 * cond_ref - uncond(x, sigma), rtol=1e-5, atol=1e-5)
    assert calls == [6, 6]
