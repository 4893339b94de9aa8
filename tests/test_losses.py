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

    loss = lambda p, k, b: losses.edm_loss(k, p, b, denoise=denoise)[0]  # noqa: E731
    fn = jax.jit(jax.grad(loss))
    key, batch = jax.random.key(0), {"image": jnp.ones((8, 2, 2, 1))}
    g = float(fn(0.5, key, batch))
    # the loss is quadratic in p (same sigma and noise draws): a central difference is exact
    h = 0.25
    want = (float(loss(0.5 + h, key, batch)) - float(loss(0.5 - h, key, batch))) / (2 * h)
    assert g == pytest.approx(want, rel=1e-4) and abs(g) > 1e-3


def test_bad_weighting_and_loss():
    with pytest.raises(ValueError, match="'min-snr'.*karras"):
        losses.make_loss("edm", lambda *a: 0, weighting="min-snr")
    with pytest.raises(ValueError, match="'l1'.*edm"):
        losses.make_loss("l1", lambda *a: 0)


# --------------------------------------------------------------------------- density x weighting

# Options every density needs (the others take their defaults); a new density must be added here.
DENSITY_OPTIONS = {
    "lognormal": {"P_mean": -0.4, "P_std": 1.0},
    "loglogistic": {"loc": -0.5, "scale": 0.7, "min_value": 0.01, "max_value": 50.0},
    "loguniform": {"min_value": 0.01, "max_value": 50.0},
    "v_diffusion": {"min_value": 0.01, "max_value": 50.0},
    "split_lognormal": {"loc": -0.5, "scale_1": 1.2, "scale_2": 0.8},
    "cosine_interpolated": {"image_d": 8, "noise_d_low": 4, "noise_d_high": 8},
    "vp_uniform": {"epsilon_t": 1e-3},
    "ve_uniform": {"sigma_min": 0.02, "sigma_max": 80.0},
}
LAMBDA = {  # lambda(sigma) written out (EDM Table 1, k-diffusion's weightings over c_out^2)
    "karras": lambda s, sd: (s**2 + sd**2) / (s * sd) ** 2,
    "edm": lambda s, sd: (s**2 + sd**2) / (s * sd) ** 2,
    "snr": lambda s, sd: 1 / s**2,
    "soft-min-snr": lambda s, sd: 1 / (s**2 + sd**2),
}


def test_every_density_with_every_weighting():
    """D = 0 makes |D - y|^2 independent of the noise: the loss is lambda(sigma) mean(y^2) exactly."""
    from edm_jax import schedules

    assert set(DENSITY_OPTIONS) == set(schedules.DENSITIES)
    assert set(LAMBDA) == set(losses.WEIGHTINGS)
    y = jnp.linspace(-1.0, 1.0, 6 * 2 * 2).reshape(6, 2, 2, 1)
    rng, sd = jax.random.key(7), 0.6
    for density, opts in DENSITY_OPTIONS.items():
        shared = {"sigma_data": sd} if density in ("v_diffusion", "cosine_interpolated") else {}
        sigma_ref = schedules.DENSITIES[density](jax.random.split(rng)[0], (6,), **opts, **shared)
        for weighting, lam in LAMBDA.items():
            fn = losses.make_loss("edm", lambda p, x, s: 0 * x, density=density,
                                  weighting=weighting, sigma_data=sd, **opts)  # fmt: skip
            loss, aux = fn(rng, None, {"image": y})
            s = np.asarray(aux["sigma"], np.float64)
            np.testing.assert_array_equal(aux["sigma"], sigma_ref)  # the density was used
            expected = lam(s, sd) * np.mean(np.asarray(y, np.float64) ** 2, axis=(1, 2, 3))
            np.testing.assert_allclose(aux["per_example"], expected, rtol=2e-5)
            assert np.isfinite(float(loss)) and np.all(s > 0), (density, weighting)


def test_loguniform_soft_min_snr_matches_analytic(x64):
    """E over ln sigma ~ U(ln a, ln b) of s^2 sigma^2/(s^2 + sigma^2) / (sigma^2 + sd^2)."""
    a, b, sd = 0.01, 20.0, 0.5
    k_data, k_loss = jax.random.split(jax.random.key(4))
    batch = _batch(k_data)
    sig = np.exp(np.linspace(np.log(a), np.log(b), 200_001))
    expected = np.mean(STD**2 * sig**2 / (STD**2 + sig**2) / (sig**2 + sd**2))
    fn = losses.make_loss("edm", _exact_denoise(), density="loguniform",
                          weighting="soft-min-snr", min_value=a, max_value=b)  # fmt: skip
    loss, aux = fn(k_loss, None, batch)
    se = float(jnp.std(aux["per_example"])) / math.sqrt(B)
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)


def test_presets_are_the_density_weighting_loss():
    """edm/vp/ve are lognormal x karras, vp_uniform x snr and ve_uniform x snr, number for number."""
    y = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
    den = lambda p, x, s: jnp.tanh(x) * p  # noqa: E731
    pairs = [(losses.edm_loss, "lognormal", "karras"), (losses.vp_loss, "vp_uniform", "snr"),
             (losses.ve_loss, "ve_uniform", "snr")]  # fmt: skip
    for preset, density, weighting in pairs:
        a, _ = preset(jax.random.key(2), 0.5, {"image": y}, denoise=den)
        spec = losses.LossSpec(density, {}, weighting)
        b, _ = losses.diffusion_loss(jax.random.key(2), 0.5, {"image": y}, denoise=den, spec=spec)
        assert float(a) == float(b)


def test_learned_uncertainty_form():
    """EDM2 eq. 21: a denoiser returning (D, logvar) gets lambda/exp(logvar) |D - y|^2 + logvar."""
    y = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    logvar = jnp.array([-1.0, 0.0, 0.5, 2.0])
    den = lambda p, x, s: 0.5 * x  # noqa: E731
    plain, a = losses.make_loss("edm", den)(jax.random.key(1), None, {"image": y})
    fn = losses.make_loss("edm", lambda p, x, s: (den(p, x, s), logvar), uncertainty=True)
    _, b = fn(jax.random.key(1), None, {"image": y})
    expected = np.asarray(a["per_example"]) * np.exp(-np.asarray(logvar)) + np.asarray(logvar)
    np.testing.assert_allclose(b["per_example"], expected, rtol=1e-6)
    np.testing.assert_array_equal(b["logvar"], logvar)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": "lognormall"}, r"'lognormall' \(did you mean 'lognormal'\?\).*loglogistic"),
        ({"density": "loguniform"}, r"'loguniform' needs the options \['max_value', 'min_value'\]"),
        ({"Pmean": 0.0}, r"\['Pmean'\].*'lognormal'.*'P_mean'"),
        ({"weighting": "snrr"}, r"'snrr' \(did you mean 'snr'\?\).*soft-min-snr"),
        ({"density": "ve_uniform", "P_mean": 0.0}, r"\['P_mean'\].*'ve_uniform'.*sigma_max"),
    ],
)
def test_bad_density_weighting_or_option_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.make_loss("edm", lambda *a: 0, **kwargs)


def test_loss_from_config_section():
    spec = losses.from_config({"name": "vp", "density": "", "weighting": "karras", "kwargs": {}})
    assert (spec.density, spec.weighting) == ("vp_uniform", "karras")
    spec = losses.from_config(
        {"name": "edm", "density": "loguniform", "weighting": "",
         "kwargs": {"min_value": 0.1, "max_value": 10.0, "sigma_data": 1.0}}
    )  # fmt: skip
    assert spec == losses.LossSpec(
        "loguniform", {"min_value": 0.1, "max_value": 10.0}, "karras", 1.0
    )
