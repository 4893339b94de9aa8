"""Sample grids during training: EMA params, fixed seed, EDM's Heun sampler (Algorithm 1)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from edm_jax import schedules

Array = jax.Array

__all__ = ["grid_labels", "make_grid_sampler", "save_grid", "tile_images"]


def grid_labels(n: int, label_dim: int) -> Array | None:
    """Class i % label_dim for sample i (each grid column one class when width = classes)."""
    return jnp.arange(n, dtype=jnp.int32) % label_dim if label_dim else None


def make_grid_sampler(
    model, *, n: int, steps: int = 18, sampler: str = "heun", sigma_max: float = 80.0
) -> Callable[[Array, object], Array]:
    """jit fn(rng, params) -> n samples [n,H,W,C] in [-1,1], class i % classes for sample i."""
    from edm_jax.samplers import SAMPLERS  # the sampler module lands beside this one

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
    lo = max(float(model.precond.sigma_min), 0.002)
    hi = min(float(model.precond.sigma_max), sigma_max)
    sigmas = schedules.karras(steps, lo, hi)
    labels = grid_labels(n, model.label_dim)
    shape = (n, model.img_resolution, model.img_resolution, model.img_channels)

    @jax.jit
    def sample(rng: Array, params) -> Array:
        k_x, k_s = jax.random.split(rng)
        x = jax.random.normal(k_x, shape, jnp.float32) * sigmas[0]

        def denoise(x, sigma):
            return model.denoise(params, x, sigma, labels=labels)

        out = SAMPLERS[sampler](denoise, x, sigmas, rng=k_s)
        return out if getattr(model, "encoder", None) else jnp.clip(out, -1.0, 1.0)

    if getattr(model, "encoder", None):  # latent model: decode to images in [-1, 1]
        from edm_jax.data.latents import decode_to_unit_range

        return lambda rng, params: decode_to_unit_range(model.encoder, sample(rng, params))
    return sample


def tile_images(images: np.ndarray, cols: int, min_tile: int = 32) -> np.ndarray:
    """[n,H,W,C] in [-1,1] -> uint8 grid [rows*H*s, cols*W*s, C], s upscales tiles to min_tile."""
    n, H, W, C = images.shape
    rows = -(-n // cols)
    s = max(1, -(-min_tile // H))
    x = np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
    x = np.concatenate([x, np.zeros((rows * cols - n, H, W, C), np.uint8)])
    x = x.repeat(s, axis=1).repeat(s, axis=2)
    x = x.reshape(rows, cols, H * s, W * s, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows * H * s, cols * W * s, C)


def save_grid(path: str | Path, images: np.ndarray, cols: int) -> Path:
    """Write the image grid as PNG atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = tile_images(images, cols)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
