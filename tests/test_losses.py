"""Losses against their analytic value on Gaussian data with the exact denoiser."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic, losses

B, D = 4096, 16
MEAN, STD = 0.3, 0.7


def _batch(rng, std=STD):
    y = MEAN + std * jax.random.normal(rng, (B, 4, 4, 1), jnp.float64)
    return {"image": y}


def _exact_denoise(std=STD):
    d = analytic.gaussian_denoiser(MEAN, std)
    return lambda params, x, sigma, **cond: d(x, sigma)


def _lognormal_expectation(f, P_mean=-1.2, P_std=1.2, n=80):
    """E_{ln sigma ~ N(P_mean, P_std^2)} f(sigma) by Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return float(np.sum(w * f(np.exp(P_mean + P_std * z))) / math.sqrt(2 * math.pi))


def test_edm_loss_of_exact_denoiser_is_analytic(x64):
    """Per pixel E|D - y|^2 = sigma^2 s^2/(s^2 + sigma^2) for N(mu, s^2) data; times lambda."""
    sd = 0.5
    per_sigma = lambda s: (s**2 + sd**2) / (s * sd) ** 2 * s**2 * STD**2 / (STD**2 + s**2)  # noqa: E731
    expected = _lognormal_expectation(per_sigma)
    k_data, k_loss = jax.random.split(jax.random.key(0))
    loss, aux = losses.edm_loss(k_loss, None, _batch(k_data), denoise=_exact_denoise())
    se = float(jnp.std(aux["per_example"])) / math.sqrt(B)
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)
    assert aux["per_example"].shape == (B,) and aux["sigma"].shape == (B,)


def test_edm_loss_is_one_when_data_std_is_sigma_data(x64):
    """With s = sigma_data the EDM-weighted error of the ideal denoiser is 1 at every sigma."""
    k_data, k_loss = jax.random.split(jax.random.key(3))
    batch = _batch(k_data, std=0.5)
    loss, aux = losses.edm_loss(k_loss, None, batch, denoise=_exact_denoise(0.5))
    se = float(jnp.std(aux["per_example"])) / math.sqrt(B)
    assert abs(float(loss) - 1.0) < 4 * se


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_wrong_denoiser_scores_worse(name, x64):
    k_data, k_loss = jax.random.split(jax.random.key(1))
    batch = _batch(k_data)
    good, _ = losses.make_loss(name, _exact_denoise())(k_loss, None, batch)
    for wrong in (_exact_denoise(std=1.5 * STD), lambda p, x, s: x, lambda p, x, s: 0 * x + MEAN):
        bad, _ = losses.make_loss(name, wrong)(k_loss, None, batch)
        assert float(bad) > float(good)


def test_vp_and_ve_losses_match_analytic(x64):
    """lambda = 1/sigma^2: per-sigma expectation s^2/(s^2 + sigma^2), averaged over the t-density."""
    k_data, k_loss = jax.random.split(jax.random.key(2))
    batch = _batch(k_data)
    t = np.linspace(1e-5, 1, 200_001)
    vp_sigma = np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))
    expected = {"vp": np.mean(STD**2 / (STD**2 + vp_sigma**2))}
    u = np.linspace(0, 1, 200_001)
    ve_sigma = 0.02 * (100 / 0.02) ** u
    expected["ve"] = np.mean(STD**2 / (STD**2 + ve_sigma**2))
    for name in ("vp", "ve"):
        loss, aux = losses.make_loss(name, _exact_denoise())(k_loss, None, batch)
        se = float(jnp.std(aux["per_example"])) / math.sqrt(B)
        assert abs(float(loss) - expected[name]) < 4 * se, name


def test_weightings_relate_to_edm_cout(x64):
    s = jnp.array([0.01, 0.5, 3.0])
    sd = 0.5
    c_out2 = (s * sd) ** 2 / (s**2 + sd**2)
    np.testing.assert_allclose(losses.weight("karras", s, sd), 1 / c_out2, rtol=1e-12)
    np.testing.assert_allclose(
        losses.weight("snr", s, sd), sd**2 / (s**2 + sd**2) / c_out2, rtol=1e-12
    )
    soft = (s * sd) ** 2 / (s**2 + sd**2) ** 2
    np.testing.assert_allclose(losses.weight("soft-min-snr", s, sd), soft / c_out2, rtol=1e-12)


def test_labels_reach_the_denoiser():
    seen = {}

    def denoise(params, x, sigma, labels=None, augment_labels=None):
        seen.update(labels=labels, augment_labels=augment_labels)
        return x

    batch = {
        "image": jnp.zeros((2, 2, 2, 1)),
        "label": jnp.array([1, 2]),
        "augment_labels": jnp.ones((2, 9)),
    }
    losses.edm_loss(jax.random.key(0), None, batch, denoise=denoise)
    np.testing.assert_array_equal(seen["labels"], [1, 2])
    assert seen["augment_labels"].shape == (2, 9)


def test_jit_and_grad():
    def denoise(params, x, sigma):
        return params * x

    fn = jax.jit(jax.grad(lambda p, k, b: losses.edm_loss(k, p, b, denoise=denoise)[0]))
    g = fn(0.5, jax.random.key(0), {"image": jnp.ones((8, 2, 2, 1))})
    assert np.isfinite(float(g))


def test_bad_weighting_and_loss():
    with pytest.raises(ValueError, match="'min-snr'.*karras"):
        losses.make_loss("edm", lambda *a: 0, weighting="min-snr")
    with pytest.raises(ValueError, match="'l1'.*edm"):
        losses.make_loss("l1", lambda *a: 0)
