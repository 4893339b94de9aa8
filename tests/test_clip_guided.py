"""k-diffusion's CLIP guidance (``sample_clip_guided.py``) and CLIP evaluation features against
../shared/fixtures/clip_guided.npz: augmentation, resize_right, loss, guided denoiser, sampler."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from edm_jax.clip import convert, features
from edm_jax.clip import guidance as G
from edm_jax.clip import model as clip_model
from edm_jax.samplers.kdiffusion import sample_dpmpp_2s_ancestral


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else np.transpose(a, (0, 1, 3, 4, 2))


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    z = np.load(fixtures_dir / "clip_guided.npz")
    o = np.load(fixtures_dir / "clip_openai.npz")
    config = clip_model.CLIPConfig.openai(**json.loads(str(o["config_json"]))["kwargs"])
    sd = {k.removeprefix("param/"): o[k] for k in o if k.startswith("param/")}
    params = convert.from_state_dict(sd, config)
    net = clip_model.CLIP(config)
    encode = jax.jit(lambda x: net.apply({"params": params}, x, method="encode_image"))
    return z, config, params, encode


def _inner_denoiser(z):
    """The fixture's tiny conv net inside K.Denoiser(sigma_data=0.5), NHWC."""
    p = {
        k.removeprefix("denoiser/param/"): jnp.asarray(z[k]) for k in z if k.startswith("denoiser/")
    }

    def conv(x, name):
        w = jnp.transpose(p[f"{name}.weight"], (2, 3, 1, 0))
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + p[f"{name}.bias"]

    def denoise(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), x.shape[:1])
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in = (
            0.25 / (s**2 + 0.25),
            s * 0.5 / jnp.sqrt(s**2 + 0.25),
            1 / jnp.sqrt(s**2 + 0.25),
        )
        emb = (jnp.log(sigma)[:, None] / 4) @ p["emb.weight"].T + p["emb.bias"]
        h = jax.nn.silu(conv(x * c_in, "conv_in") + emb[:, None, None, :])
        h = jax.nn.silu(conv(h, "conv_mid"))
        return conv(h, "conv_out") * c_out + x * c_skip

    return denoise


@pytest.mark.parametrize("size", [16, 20, 32, 64, 48])
def test_image_pipeline(fx, size):
    z, config, _, encode = fx
    u = (jnp.asarray(nhwc(z[f"pipe_{size}_x"])) + 1) / 2
    augmented = G.translate(u, jnp.asarray(z[f"pipe_{size}_translations"]))
    np.testing.assert_allclose(augmented, nhwc(z[f"pipe_{size}_augmented"]), atol=1e-5)
    np.testing.assert_allclose(
        G.resize(augmented, (32, 32)), nhwc(z[f"pipe_{size}_resized"]), atol=1e-5
    )
    embed = G.image_embed(encode, augmented, config.image_resolution)
    ref = z[f"pipe_{size}_embed_normalized"]
    assert np.abs(embed - ref).max() <= 2e-5 * np.abs(ref).max()
    loss = G.spherical_dist_loss(embed, z["target_embed"])
    np.testing.assert_allclose(loss, z[f"pipe_{size}_loss"], rtol=2e-5)


def test_image_prompt_targets(fx, tmp_path):
    """Image prompts: the guidance's embedding of each whole image (the fixture's pipeline)."""
    z, config, params, _ = fx
    images = [(jnp.asarray(nhwc(z["pipe_16_augmented"][i : i + 1]))) for i in range(2)]
    targets = G.image_targets(params, config, images)
    ref = z["pipe_16_embed_normalized"][:2]
    assert targets.shape == ref.shape and np.abs(targets - ref).max() <= 2e-5 * np.abs(ref).max()
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="is not an image PIL can read"):
        G.load_image01(tmp_path / "x.png")


def test_resize_rows_sum_to_one_and_identity():
    for a, b in [(16, 32), (64, 32), (48, 32), (7, 3)]:
        np.testing.assert_allclose(G.resize_matrix(a, b).sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(G.resize_matrix(8, 8), np.eye(8), atol=1e-6)


def test_spherical_dist_loss(fx):
    z = fx[0]
    x, y = jnp.asarray(z["sph_x"]), jnp.asarray(z["sph_y"])
    loss = G.spherical_dist_loss(x, y)
    grad = jax.grad(lambda a: G.spherical_dist_loss(a, y).sum())(x)
    rows = np.array([0, 1, 3, 4, 5])
    np.testing.assert_allclose(loss[rows], z["sph_loss"][rows], atol=1e-5)
    np.testing.assert_allclose(grad[rows], z["sph_grad_x"][rows], atol=1e-5)
    np.testing.assert_allclose(loss[2], z["sph_loss"][2], atol=2e-4)
    np.testing.assert_allclose(grad[2], z["sph_grad_x"][2], rtol=2e-2, atol=1e-6)
    assert float(loss[3]) == 0 and not np.any(grad[3])  # exactly parallel: 0, and a finite grad
    bloss = G.spherical_dist_loss(jnp.asarray(z["sph_bx"]), jnp.asarray(z["sph_by"]))
    np.testing.assert_allclose(bloss, z["sph_bloss"], atol=1e-5)


def _guided(fx, shifts):
    z, config, _, encode = fx
    scale = json.loads(str(z["config_json"]))["clip_guidance_scale"]
    embed = lambda images01: G.image_embed(encode, images01, config.image_resolution)  # noqa: E731
    weights = jnp.ones((1,), jnp.float32)
    return G.clip_guided(
        _inner_denoiser(z), embed, jnp.asarray(z["target_embed"]), weights, scale, shifts
    )


def test_guided_denoiser(fx):
    z = fx[0]
    guided = jax.jit(lambda x, sigma, t: _guided(fx, lambda *_: t)(x, sigma))
    for i, sigma in enumerate(z["cond_sigmas"]):
        out = guided(
            jnp.asarray(nhwc(z["cond_x"])[i]), sigma, jnp.asarray(z["cond_translations"][i])
        )
        np.testing.assert_allclose(out, nhwc(z["cond_out"])[i], atol=1e-4, err_msg=f"sigma {sigma}")


def test_four_guided_sampler_steps(fx):
    """dpmpp_2s_ancestral, eta 1, 4 Karras steps: each of the 7 model calls replays its recorded
    translations (in call order) and each step its recorded pseudo-noise."""
    z = fx[0]
    calls = itertools.count()
    translations = z["sample_translations"]

    def next_shift():
        return translations[next(calls)].astype(np.float32)

    def shifts(x, sigma):
        return io_callback(next_shift, jax.ShapeDtypeStruct((2, 2), jnp.float32), ordered=True)

    sigmas = jnp.asarray(z["sample_sigmas"])
    noise = jnp.asarray(nhwc(z["sample_noise"]))

    def noise_sampler(sigma, sigma_next):
        return noise[jnp.argmin(jnp.abs(sigmas[:-1] - sigma))]

    x0 = jnp.asarray(nhwc(z["sample_x_init"]))
    out = sample_dpmpp_2s_ancestral(
        _guided(fx, shifts), x0, sigmas, eta=1.0, noise_sampler=noise_sampler
    )
    assert next(calls) == 7
    np.testing.assert_allclose(out, nhwc(z["sample_out"]), atol=1e-4)
    unguided = sample_dpmpp_2s_ancestral(
        lambda x, s: jnp.clip(_inner_denoiser(z)(x, s), -1, 1),
        x0,
        sigmas,
        eta=1.0,
        noise_sampler=noise_sampler,
    )
    np.testing.assert_allclose(unguided, nhwc(z["sample_out_unguided"]), atol=1e-4)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_evaluation_features(fx, size):
    z, config, params, _ = fx
    x = jnp.asarray(nhwc(z[f"eval_{size}_x"]))
    np.testing.assert_allclose(
        features.eval_resize(x, config.image_resolution), nhwc(z[f"eval_{size}_resized"]), atol=1e-5
    )
    got = features.clip_features(params, config, x)
    ref = z[f"eval_{size}_features"]
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()


def test_prompt_parsing():
    assert G.parse_prompts("a red cat") == [("a red cat", 1.0)]
    assert G.parse_prompts("a:1|b: -0.5") == [("a", 1.0), ("b", -0.5)]
    assert G.parse_prompts("a cat: 2") == [("a cat", 2.0)]
    assert G.parse_prompts("ratio 16:9 photo") == [("ratio 16:9 photo", 1.0)]
    with pytest.raises(ValueError, match="empty part"):
        G.parse_prompts("a|")
    with pytest.raises(ValueError, match="sum to 0"):
        G.parse_prompts("a:1|b:-1")


def test_fd_clip_metric(fx, tmp_path):
    """fd_clip through the metrics library: the detector is k-diffusion's CLIP features, and the
    Fréchet distance of a set to itself is 0 and to another set > 0."""
    from edm_jax.metrics import detectors, evaluate, refs
    from edm_jax.nets.reader import write_safetensors

    z, config, params, _ = fx
    path = tmp_path / "clip.safetensors"
    write_safetensors(path, convert.to_state_dict(params))
    det = detectors.load_detector("clip", path)
    x = nhwc(z["eval_16_x"])
    np.testing.assert_allclose(
        det.features(jnp.asarray(x)), z["eval_16_features"], atol=2e-5 * 5.66
    )
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    b = (b // 2).astype(np.uint8)
    scorer = evaluate.Scorer(("fd_clip",), {"clip": det}, len(a), 4)
    refs.save_ref(tmp_path / "ref.npz", evaluate.score_arrays(a, scorer).reference())
    ref = refs.load_ref(tmp_path / "ref.npz")
    scorer = evaluate.Scorer(("fd_clip",), {"clip": det}, len(a), 6)
    same = evaluate.score_arrays(a, scorer).results(ref)["fd_clip"]
    scorer = evaluate.Scorer(("fd_clip",), {"clip": det}, len(b), 6)
    other = evaluate.score_arrays(b, scorer).results(ref)["fd_clip"]
    assert abs(same) < 1e-3 and other > 0.1
