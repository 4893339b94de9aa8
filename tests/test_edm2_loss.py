"""EDM2Loss parity with NVlabs/edm2 (edm2_loss.npz): loss, denoised, logvar and gradients."""

import functools

import jax
import numpy as np
import pytest

import edm_jax
from edm_jax.losses import make_loss
from edm_jax.nets.convert import to_state_dict
from edm_jax.nets.edm2_unet import edm2_logvar, forced_normalize


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def setup(fixtures_dir):
    """(model, params, fixture data, jitted value-and-grad of the loss with the recorded draws)."""
    d = dict(np.load(fixtures_dir / "edm2_loss.npz"))
    model, params, _ = edm_jax.load(str(fixtures_dir / "net_edm2_cond.npz"))
    loss_fn = make_loss(
        "edm2",
        model.denoise,
        logvar=functools.partial(edm2_logvar, model),
        P_mean=-0.4,
        P_std=1.0,
        rnd_normal=d["rnd_normal"].reshape(-1),
        noise=nhwc(d["noise_randn"]),
    )
    batch = {"image": nhwc(d["images"]), "label": d["class_labels"]}
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(jax.random.key(0), p, batch), has_aux=True))
    return model, params, d, f


def _check_outputs(value, aux, d, suffix=""):
    loss_ref = d["loss" + suffix]
    assert rel(value, loss_ref.sum() / loss_ref.shape[0]) < 1e-5
    assert rel(aux["per_example"], loss_ref.sum(axis=(1, 2, 3))) < 1e-5
    assert rel(aux["denoised"], nhwc(d["denoised" + suffix])) < 1e-5
    assert rel(aux["logvar"], d["logvar" + suffix].reshape(-1)) < 1e-5
    np.testing.assert_allclose(aux["sigma"], d["sigma"].reshape(-1), rtol=1e-6)


def test_loss_and_gradients_match_reference(setup):
    model, params, d, f = setup
    (value, aux), grads = f(params)
    _check_outputs(value, aux, d)
    sd = to_state_dict(grads, model)
    names = [k[len("grad/") :] for k in d if k.startswith("grad/")]
    assert sorted(names) == sorted(k for k in sd if not k.endswith(("freqs", "phases")))
    errors = {n: rel(sd[n], d["grad/" + n]) for n in names}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_training_mode_loss_is_loss_after_forced_normalisation(setup):
    _, params, d, f = setup
    (value, aux), _ = f(jax.jit(forced_normalize)(params))
    _check_outputs(value, aux, d, "_train")


def test_edm2_loss_draws_lognormal_sigma_and_weights_by_exp_logvar():
    """Zero denoiser, constant logvar c: loss = mean_b(lambda_b e^-c |y|^2) + c * elements."""
    y = np.full((4096, 2, 2, 1), 0.5, np.float32)
    c = 0.3
    value, aux = edm2_loss_jit(jax.random.key(1), y, c)
    sigma = np.asarray(aux["sigma"], np.float64)
    assert abs(np.log(sigma).mean() - (-0.4)) < 0.05 and abs(np.log(sigma).std() - 1.0) < 0.05
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    want = np.mean(lam * np.exp(-c) * np.sum(y[0] ** 2)) + c * y[0].size
    assert float(value) == pytest.approx(want, rel=1e-5)


@functools.partial(jax.jit, static_argnums=2)
def edm2_loss_jit(rng, y, c):
    loss_fn = make_loss(
        "edm2",
        lambda p, x, s, **cond: x * 0,
        logvar=lambda p, s: jax.numpy.full(s.shape, c),
    )
    return loss_fn(rng, {}, {"image": y})
