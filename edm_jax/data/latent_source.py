"""`LatentSource`: the dataset tool's latent output (VAE mean and std per image) for training.

A folder written by ``python -m edm_jax.data.tool ... --encoder ...``: ``manifest.json``,
``labels.npy`` and shards ``latents-NNNNN.npy`` of float32 [n,h,w,2L] raw latents (mean,
then std, on channels). Shards are memory-mapped, so the dataset need not fit in RAM.
Records are ``{'image': float32 [h,w,2L], 'label': int32}``; the training pipeline turns
them into final latents with a fresh draw each step (``LatentCodec.encode_latents``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["LatentSource"]


class LatentSource:
    """Random access to encoded latents; `resolution`/`channels` are the final latents'."""

    is_latent = True

    def __init__(self, path, *, use_labels: bool = False):
        root = Path(os.path.expanduser(str(path)))
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            hint = (
                " (an interrupted dataset tool run? rerun it)"
                if Path(f"{root}.partial").exists()
                else ""
            )
            raise FileNotFoundError(f"no latent dataset at {root}: {manifest_path} missing{hint}")
        self.manifest = m = json.loads(manifest_path.read_text())
        if m.get("format") != "edm_jax-latents":
            raise ValueError(
                f"{manifest_path}: not an edm_jax latent dataset (format {m.get('format')!r})"
            )
        self._shards = [np.load(root / s["file"], mmap_mode="r") for s in m["shards"]]
        counts = [s["count"] for s in m["shards"]]
        self._starts = np.cumsum([0, *counts])
        if [len(a) for a in self._shards] != counts or self._starts[-1] != m["count"]:
            raise ValueError(f"{root}: shard sizes do not match manifest.json (damaged dataset)")
        h, w, c2 = m["latent_shape"]
        self.resolution, self.channels = int(h), int(c2) // 2
        self.encoder = dict(m["encoder"])
        labels = np.load(root / "labels.npy")
        if use_labels and not m["has_labels"]:
            raise ValueError(f"use_labels=True but {root} has no labels; set use_labels=False")
        self._labels = labels.astype(np.int32) if use_labels else None
        self.num_classes = int(m["num_classes"]) if use_labels else 0

    def __len__(self) -> int:
        """Number of images."""
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of a record."""
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return s, index - int(self._starts[s])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """{'image': raw latents float32 [h,w,2L], 'label': int32 scalar (0 when unlabeled)}."""
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} latents")
        index %= n
        s, r = self._locate(index)
        label = 0 if self._labels is None else self._labels[index]
        return {
            "image": np.asarray(self._shards[s][r], np.float32),
            "label": np.asarray(label, np.int32),
        }

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Raw latents float32 [b,h,w,2L] and labels int32 [b]."""
        indices = np.asarray(indices, np.int64)
        lat = np.stack([self[int(i)]["image"] for i in indices])
        labels = np.zeros(len(indices), np.int32) if self._labels is None else self._labels[indices]
        return lat, labels

    def __repr__(self) -> str:
        """Short description."""
        return (
            f"LatentSource(n={len(self)}, latent={self.resolution}x{self.resolution}x"
            f"{self.channels}, num_classes={self.num_classes}, encoder={self.encoder.get('name')})"
        )
