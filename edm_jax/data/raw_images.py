"""Images of any edm_jax source at their stored size, for the dataset tool.

The training sources (``sources.py``) fit every image to one resolution; the dataset tool
needs the originals to apply its own transform, and needs to name (or skip) files that
cannot be decoded instead of failing when the source is built. A ``RawImages`` lists the
records with their names and labels; ``read(i)`` decodes one to uint8 [H,W,C].

Spec strings: a directory (image folder), ``*.zip`` (NVlabs/edm zip), ``*.npz`` (arrays),
``digits`` (scikit-learn's 8x8 digits), ``tfds:NAME[/SPLIT]`` (TensorFlow Datasets).
Labels follow the training sources: ``dataset.json`` if present, else class subfolders
(folders with more than one top-level subfolder, as NVlabs' tool does).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image

from edm_jax.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS

__all__ = ["RawImages", "open_raw"]

_MODES = {1: "L", 3: "RGB"}


def _decode(data: bytes | Path, channels: int, name: str) -> np.ndarray:
    """Decode an encoded image (bytes or path) to uint8 [H,W,C]; errors name the file."""
    try:
        with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as f:
            f.load()
            img: PIL.Image.Image = f
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
                img = PIL.Image.fromarray(a)
            if img.mode == "P":
                img = img.convert("RGBA")
            a = np.asarray(img.convert(_MODES[channels]), dtype=np.uint8)
    except DECODE_ERRORS as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return a.reshape(*a.shape[:2], channels)


def _labels(raw: bytes | None, names: list[str]) -> list[int] | None:
    """Labels from an EDM dataset.json, else top-level folder names (if more than one)."""
    if raw is not None:
        table = json.loads(raw).get("labels")
        if table is not None:
            table = {str(k).replace("\\", "/"): v for k, v in table}
            return [int(table[n]) if table.get(n) is not None else -1 for n in names]
    tops = [n.split("/")[0] if "/" in n else "" for n in names]
    classes = sorted(set(tops))
    if len(classes) <= 1:
        return None
    return [classes.index(t) for t in tops]


class RawImages:
    """Records of a source: `names`, `labels` (int list or None), `read(i)` -> uint8 [H,W,C]."""

    def __init__(self, names, labels, reader, channels: int):
        self.names, self.labels, self._reader, self.channels = list(names), labels, reader, channels

    def __len__(self) -> int:
        """Number of records."""
        return len(self.names)

    def read(self, index: int) -> np.ndarray:
        """Decoded record `index`, uint8 [H,W,C]; ValueError naming it if undecodable."""
        img = self._reader(index)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[-1] != self.channels:
            img = _decode_array(img, self.channels, self.names[index])
        return img


def _decode_array(img: np.ndarray, channels: int, name: str) -> np.ndarray:
    """Convert a uint8 array's channels (1, 3 or 4) to `channels` through PIL."""
    if img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: images need 1, 3 or 4 channels, got shape {img.shape}")
    pil = PIL.Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img)
    a = np.asarray(pil.convert(_MODES[channels]), dtype=np.uint8)
    return a.reshape(*a.shape[:2], channels)


def _folder(root: Path, channels: int) -> RawImages:
    """An image folder (recursive, sorted relative paths)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    names = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    meta = root / "dataset.json"
    labels = _labels(meta.read_bytes() if meta.exists() else None, names)
    return RawImages(
        names, labels, lambda i: _decode(root / names[i], channels, str(root / names[i])), channels
    )


def _zip(path: Path, channels: int) -> RawImages:
    """An NVlabs/edm zip (images + optional dataset.json)."""
    with zipfile.ZipFile(path) as z:
        all_names = set(z.namelist())
    names = sorted(n for n in all_names if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    with zipfile.ZipFile(path) as z:
        meta = z.read("dataset.json") if "dataset.json" in all_names else None
    handle: list[zipfile.ZipFile] = []

    def read(i: int) -> np.ndarray:
        if not handle:
            handle.append(zipfile.ZipFile(path))
        return _decode(handle[0].read(names[i]), channels, f"{path}:{names[i]}")

    return RawImages(names, _labels(meta, names), read, channels)


def _npz(path: Path, channels: int) -> RawImages:
    """A .npz of uint8 images (images/image/x/arr_0) and optional labels (labels/label/y)."""
    with np.load(path) as f:
        key = next((k for k in ("images", "image", "x", "arr_0") if k in f), None)
        if key is None:
            raise ValueError(f"{path}: no images array (tried images, image, x, arr_0)")
        images = f[key]
        lkey = next((k for k in ("labels", "label", "y") if k in f), None)
        labels = [int(v) for v in f[lkey]] if lkey else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: images must be uint8 [N,H,W(,C)], got {images.dtype} {images.shape}"
        )
    names = [f"{path.name}[{i}]" for i in range(len(images))]
    return RawImages(names, labels, lambda i: images[i], channels)


def _digits(channels: int) -> RawImages:
    """scikit-learn's 8x8 digits as uint8 (values 0..16 -> round(v * 255 / 16))."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    names = [f"digits[{i}]" for i in range(len(images))]
    return RawImages(names, [int(t) for t in bunch.target], lambda i: images[i], channels)


def _tfds(spec: str, channels: int) -> RawImages:
    """tfds:NAME[/SPLIT] through TfdsSource's ArrayRecord reader, at stored size."""
    from edm_jax.data.tfds_source import TfdsSource

    name, _, split = spec[len("tfds:") :].partition("/")
    src = TfdsSource(
        name, split=split or "train", resolution=1, channels=channels, use_labels=False
    )
    ds, key, lkey = src._ds, src._image_key, src._label_key
    names = [f"{spec}[{i}]" for i in range(len(src))]
    labels = [int(ds[i][lkey]) for i in range(len(src))] if lkey else None
    return RawImages(names, labels, lambda i: np.asarray(ds[i][key]), channels)


def open_raw(spec: str, channels: int = 3) -> RawImages:
    """The records of a source spec (folder, .zip, .npz, 'digits', 'tfds:NAME[/SPLIT]')."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if spec == "digits":
        return _digits(channels)
    if spec.startswith("tfds:"):
        return _tfds(spec, channels)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise FileNotFoundError(
            f"--source {spec!r} does not exist (valid: a folder, a .zip, a .npz, "
            "'digits' or 'tfds:NAME[/SPLIT]')"
        )
    if path.is_dir():
        return _folder(path, channels)
    if path.suffix.lower() == ".zip":
        return _zip(path, channels)
    if path.suffix.lower() == ".npz":
        return _npz(path, channels)
    raise ValueError(
        f"--source {spec!r}: unknown kind; valid: a folder, .zip, .npz, digits, tfds:NAME"
    )
