"""EDM2's latent conventions (NVlabs/edm2 ``training/encoders.py``, StabilityVAEEncoder).

Three representations: raw pixels (uint8 [B,H,W,3]), raw latents (the VAE's mean and std
concatenated on channels, [B,h,w,2L], what a latent dataset stores) and final latents
(``(mean + std * noise) * scale + bias``, [B,h,w,L], what the diffusion model sees).
The VAE gets pixels / 255 in [0, 1] (not [-1, 1]); scale = final_std / raw_std and
bias = final_mean - raw_mean * scale are computed in float32, per latent channel;
decoding divides by the scale, clamps to [0, 1], multiplies by 255 and truncates to uint8.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.nets.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "EDM2_RAW_MEAN",
    "EDM2_RAW_STD",
    "LatentCodec",
    "final_latents",
    "latent_scale_bias",
    "load_codec",
]

EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # encoders.py defaults for sd-vae-ft-mse
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)


def latent_scale_bias(
    raw_mean: Sequence[float] = EDM2_RAW_MEAN,
    raw_std: Sequence[float] = EDM2_RAW_STD,
    final_mean: float = 0.0,
    final_std: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (scale, bias) with scale = final_std/raw_std, bias = fm - rm*scale."""
    scale = np.float32(final_std) / np.asarray(raw_std, np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, np.float32) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def final_latents(raw, noise, scale, bias):
    """(mean + noise * std) * scale + bias from raw latents [...,2L] and noise [...,L]."""
    mean, std = jnp.split(jnp.asarray(raw, jnp.float32), 2, axis=-1)
    x = mean + noise * std
    return x * jnp.asarray(scale) + jnp.asarray(bias)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentCodec:
    """A VAE with its parameters and EDM2's normalisation: pixels <-> latents (NHWC)."""

    vae: AutoencoderKL
    params: dict
    scale: np.ndarray  # float32 [L]
    bias: np.ndarray  # float32 [L]

    @classmethod
    def edm2(cls, vae: AutoencoderKL, params: dict, **normalisation) -> LatentCodec:
        """StabilityVAEEncoder's defaults (raw_mean/raw_std/final_mean/final_std overridable)."""
        return cls(vae, params, *latent_scale_bias(**normalisation))

    @property
    def latent_channels(self) -> int:
        """L: channels of the final latents."""
        return self.vae.cfg.latent_channels

    @functools.cached_property
    def _encode(self):
        """Jitted pixels uint8 -> raw latents (mean, std)."""

        def f(params, pixels):
            x = pixels.astype(jnp.float32) / 255
            d = DiagonalGaussian.from_moments(
                self.vae.apply({"params": params}, x, method="encode")
            )
            return jnp.concatenate([d.mean, d.std], axis=-1)

        return jax.jit(f)

    @functools.cached_property
    def _decode(self):
        """Jitted final latents -> VAE output before the clamp (0..1 scale)."""

        def f(params, x):
            x = (x.astype(jnp.float32) - self.bias) / self.scale
            return self.vae.apply({"params": params}, x, method="decode")

        return jax.jit(f)

    def encode_pixels(self, pixels) -> jax.Array:
        """Raw latents float32 [B,h,w,2L] (VAE mean, std) of uint8 pixels [B,H,W,C]."""
        return self._encode(self.params, jnp.asarray(pixels))

    def encode_latents(self, rng, raw) -> jax.Array:
        """Final latents [B,h,w,L]: one fresh N(0,1) draw from rng, then scale and bias."""
        raw = jnp.asarray(raw, jnp.float32)
        noise = jax.random.normal(rng, (*raw.shape[:-1], raw.shape[-1] // 2), jnp.float32)
        return final_latents(raw, noise, self.scale, self.bias)

    def decode_float(self, x) -> jax.Array:
        """The VAE's output in pixel/255 units [B,H,W,C] before the clamp, from final latents."""
        return self._decode(self.params, jnp.asarray(x))

    def decode(self, x) -> jax.Array:
        """uint8 pixels [B,H,W,C]: clamp to [0, 1], x255, truncation toward zero (as torch)."""
        return (jnp.clip(self.decode_float(x), 0, 1) * 255).astype(jnp.uint8)


@functools.lru_cache(maxsize=4)
def load_codec(encoder: str, weights: str) -> LatentCodec:
    """LatentCodec (EDM2 defaults) of a VAE preset or diffusers config.json and .npz weights."""
    import json
    from pathlib import Path

    from edm_jax.nets.vae import build_vae, load_vae_npz

    spec: str | dict = encoder
    if encoder.endswith(".json"):
        spec = json.loads(Path(encoder).read_text())
    vae = build_vae(spec)
    if not weights:
        raise ValueError(f"encoder {encoder!r} needs its weights (.npz): set encoder_weights")
    with np.load(weights) as f:
        prefix = "param/" if any(k.startswith("param/") for k in f.files) else ""
    return LatentCodec.edm2(vae, load_vae_npz(vae, weights, prefix))
