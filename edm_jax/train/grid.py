"""Sample grids during training through ``edm_jax.sample`` (the one sampling path).

A grid has one column per class (at most ``MAX_GRID_COLS``) or ``sample_grid`` columns for
unconditional models, and ``sample_grid`` rows. It is drawn in batches of at most
``MAX_BATCH_PER_DEVICE`` images per local device, so even ImageNet's 1000 classes never ask
for thousands of network calls in one batch. Seed i is image i (class i % classes), so a
grid image equals ``edm_jax.sample(rng, params, model, seeds=[i], labels=[i % classes])``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from edm_jax import api
from edm_jax.fileio import atomic_open
from edm_jax.types import Array

__all__ = [
    "MAX_BATCH_PER_DEVICE", "MAX_GRID_COLS", "GridSampler", "grid_labels", "grid_shape",
    "make_grid_sampler", "save_grid", "tile_images",
]  # fmt: skip

MAX_BATCH_PER_DEVICE = 16  # images per device in one grid batch
MAX_GRID_COLS = 32  # classes shown in a grid of a conditional model


def grid_labels(n: int, label_dim: int) -> np.ndarray | None:
    """Class i % label_dim for sample i (each grid column one class when width = classes)."""
    return np.arange(n, dtype=np.int64) % label_dim if label_dim else None


def grid_shape(label_dim: int, sample_grid: int) -> tuple[int, int]:
    """(rows, cols) of a training grid: one column per class (capped), sample_grid rows."""
    cols = min(label_dim, MAX_GRID_COLS) if label_dim else sample_grid
    return sample_grid, cols


@dataclasses.dataclass(frozen=True)
class GridSampler:
    """fn(rng, params) -> n samples [n, H, W, C] through edm_jax.sample, in bounded batches."""

    model: Any
    n: int
    batch_size: int  # images per call of the compiled program (all local devices)
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def per_device(self) -> int:
        """Images per device in one batch."""
        return -(-self.batch_size // jax.local_device_count())

    def __call__(self, rng: Array, params: Any) -> np.ndarray:
        """The grid's images [n, H, W, C] in [-1, 1] (numpy float32)."""
        labels = grid_labels(self.n, self.model.label_dim)
        return api.sample(
            rng, params, self.model, seeds=np.arange(self.n), labels=labels,
            batch_size=self.batch_size, **self.options,
        )  # fmt: skip


def make_grid_sampler(
    model,
    *,
    n: int,
    steps: int = 18,
    sampler: str = "heun",
    sigma_max: float = 80.0,
    max_batch_per_device: int = MAX_BATCH_PER_DEVICE,
) -> GridSampler:
    """A GridSampler of n images (sample i of class i % classes), checked before any compute."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"grid size n must be an int >= 1, got {n!r}")
    options = dict(sampler=sampler, num_steps=steps, sigma_max=sigma_max)
    api.check_sample_args(sampler, steps, None)
    batch = min(n, max_batch_per_device * jax.local_device_count())
    return GridSampler(model, n, batch, options)


def tile_images(images: np.ndarray, cols: int, min_tile: int = 32) -> np.ndarray:
    """[n,H,W,C] in [-1,1] -> uint8 grid [rows*H*s, cols*W*s, C], s upscales tiles to min_tile."""
    x = api.to_uint8(images)  # the package's one quantisation (NVlabs: x * 127.5 + 128)
    return api.image_grid(x, cols, min_tile=min_tile)


def save_grid(path: str | Path, images: np.ndarray, cols: int) -> Path:
    """Write the image grid as PNG atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = tile_images(images, cols)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
    return path
