"""Latent diffusion end to end: digits -> tiny random VAE latents -> training -> decoded samples."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testlib import tiny_config

from edm_jax import api
from edm_jax.data.latents import latent_scale_bias
from edm_jax.data.tool import ToolArgs, run_tool
from edm_jax.nets.vae import VAEConfig, build_vae, random_vae_params, to_state_dict
from edm_jax.train import loop
from edm_jax.train.step import _draw_latents

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """(dataset folder, config.json, weights.npz): 128 digits at 16x16 -> 8x8x4 latents."""
    root = tmp_path_factory.mktemp("latent")
    vae = build_vae(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4))
    np.savez(root / "w.npz", **to_state_dict(random_vae_params(2, vae)))
    (root / "c.json").write_text(json.dumps(TINY))
    args = ToolArgs("digits", str(root / "digits"), transform="resize", resolution=16,
                    encoder=str(root / "c.json"), encoder_weights=str(root / "w.npz"),
                    max_images=128, shard_size=64, quiet=True)  # fmt: skip
    run_tool(args)
    return str(root / "digits"), str(root / "c.json"), str(root / "w.npz")


def _config(latents, **updates):
    """configs/tiny.py on the latent digits."""
    path, cfg, weights = latents
    data = {"data.name": "latents", "data.path": path, "data.resolution": 8, "data.channels": 4,
            "data.encoder": cfg, "data.encoder_weights": weights}  # fmt: skip
    return tiny_config(**{**data, **updates})


def test_latent_draw_is_mean_plus_std_noise_then_scale_bias():
    """Each step draws fresh final latents (mean + std * N(0,1)) * scale + bias."""
    raw = jnp.concatenate([jnp.full((2, 3, 3, 4), 1.5), jnp.full((2, 3, 3, 4), 0.25)], -1)
    a, b = _draw_latents(jax.random.key(0), raw), _draw_latents(jax.random.key(1), raw)
    scale, bias = latent_scale_bias()
    noise = (np.asarray(a) - bias) / scale - 1.5
    assert abs(noise.std() / 0.25 - 1) < 0.35 and not np.allclose(a, b)
    exact = _draw_latents(jax.random.key(0), raw.at[..., 4:].set(0.0))
    np.testing.assert_allclose(exact, np.broadcast_to(1.5 * scale + bias, exact.shape), rtol=1e-6)


def test_latent_and_pixel_mismatch_fail_before_compute(latents, tmp_path):
    """A latent dataset without data.encoder, or pixel data with one: one clear error."""
    with pytest.raises(ValueError, match="holds VAE latents but config.data.encoder is empty"):
        loop.train(_config(latents, **{"data.encoder": ""}), tmp_path / "a", print_summary=False)
    pixel = tiny_config(**{"data.encoder": latents[1], "data.encoder_weights": latents[2]})
    with pytest.raises(ValueError, match="makes a latent model, but data.name='digits'"):
        loop.train(pixel, tmp_path / "b", print_summary=False)
    assert not list((tmp_path / "b").glob("checkpoints*"))


def test_latent_training_and_decoded_samples(latents, tmp_path):
    """16 steps of latent training; samples come back decoded to 16x16 RGB images."""
    config = _config(latents, **{"train.total_kimg": 0.256, "log.checkpoint_every_steps": 16,
                                 "log.log_every_steps": 8})  # fmt: skip
    out = loop.train(config, tmp_path, devices=jax.devices()[:1], print_summary=False)
    assert out["step"] == 16 and np.isfinite(out["last"]["loss"])
    model, params, _ = api.load(tmp_path)
    assert model.encoder == (latents[1], latents[2]) and model.img_channels == 4
    images = api.sample(jax.random.key(0), params, model, num_samples=4, num_steps=2)
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
