"""Random-access image sources: arrays/.npz, scikit-learn digits, image folders, EDM zips.

Every source is grain-compatible (``__len__``, ``__getitem__`` -> ``{'image': uint8
[R,R,C], 'label': int32}``) and has ``resolution``, ``channels`` and ``num_classes``
(0 when labels are not used). Every image of a folder or zip is decoded once when the
source is built (with a progress bar), so bad data fails before training starts with an
error naming the file; files already verified (same size and mtime, recorded under
``$XDG_CACHE_HOME/edm_jax/verified``) are not decoded again, so restarts are fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edm_jax.data.images import IMAGE_EXTENSIONS, check_size, decode_image, fit_array, verify_image

__all__ = ["ArraySource", "FolderSource", "ImageSource", "ZipSource", "digits_source", "npz_source"]


class ImageSource:
    """Base class: subclasses set attributes and implement `_image(index)`."""

    resolution: int
    channels: int
    num_classes: int
    _labels: np.ndarray | None  # int32 [N] or None
    class_names: list[str] | None = None  # names of the classes, where the data has them

    def __len__(self) -> int:
        """Number of images."""
        raise NotImplementedError

    def _image(self, index: int) -> np.ndarray:
        """uint8 [R,R,C] image `index` (0 <= index < len)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{'image': uint8 [R,R,C], 'label': int32 scalar (0 when unlabeled)}."""
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} images")
        index %= n
        label = 0 if self._labels is None else self._labels[index]
        return {"image": self._image(index), "label": np.int32(label)}

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [b,R,R,C] and labels int32 [b] of many records at once."""
        indices = np.asarray(indices, np.int64)
        images = np.stack([self._image(int(i)) for i in indices])
        if self._labels is None:
            return images, np.zeros(len(indices), np.int32)
        return images, self._labels[indices]

    def _set_labels(self, labels, use_labels: bool, where: str) -> None:
        """Store class labels (or none) and num_classes; error if needed but missing."""
        if not use_labels:
            self._labels, self.num_classes = None, 0
            return
        if labels is None:
            raise ValueError(f"use_labels=True but {where} has no labels; set use_labels=False")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"{where}: labels must be non-negative integer class ids")
        self._labels = labels.astype(np.int32)
        self.num_classes = int(labels.max()) + 1

    def __repr__(self) -> str:
        """Short description."""
        return (
            f"{type(self).__name__}(n={len(self)}, resolution={self.resolution}, "
            f"channels={self.channels}, num_classes={self.num_classes})"
        )


class ArraySource(ImageSource):
    """In-memory uint8 images [N,H,W,C] or [N,H,W], fitted to resolution/channels lazily."""

    def __init__(self, images, labels=None, *, resolution, channels, use_labels, name="arrays"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise ValueError(
                f"{name}: images must be a non-empty uint8 array [N,H,W,C] or [N,H,W], "
                f"got dtype {images.dtype} shape {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{name}: {len(labels)} labels for {len(images)} images")
        check_size((images.shape[2], images.shape[1]), resolution, name)
        self._images = images[..., None] if images.ndim == 3 else images  # [N,H,W,C]
        self._name = name
        self.resolution, self.channels = int(resolution), int(channels)
        fit_array(images[0], self.resolution, self.channels, name)  # validates channels early
        self._set_labels(labels, use_labels, name)

    def __len__(self) -> int:
        """Number of images."""
        return len(self._images)

    def _image(self, index: int) -> np.ndarray:
        """Fitted image `index`."""
        return fit_array(self._images[index], self.resolution, self.channels, self._name)

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of many records (one gather when no fitting is needed)."""
        shape = (self.resolution, self.resolution, self.channels)
        if self._images.shape[1:] != shape:
            return super().get_batch(indices)
        indices = np.asarray(indices, np.int64)
        labels = np.zeros(len(indices), np.int32) if self._labels is None else self._labels[indices]
        return self._images[indices], labels


def npz_source(path, *, resolution, channels, use_labels) -> ArraySource:
    """ArraySource from a .npz with `images` (or `image`/`x`/`arr_0`) and `labels` (or `y`)."""
    path = _existing(path, "npz")
    with np.load(path) as f:
        keys = list(f.keys())
        image_key = next((k for k in ("images", "image", "x", "arr_0") if k in f), None)
        if image_key is None:
            raise ValueError(f"{path}: no images array (tried images, image, x, arr_0; has {keys})")
        label_key = next((k for k in ("labels", "label", "y") if k in f), None)
        images = f[image_key]
        labels = f[label_key] if label_key else None
    return ArraySource(
        images,
        labels,
        resolution=resolution,
        channels=channels,
        use_labels=use_labels,
        name=str(path),
    )


def digits_source(*, resolution, channels, use_labels) -> ArraySource:
    """scikit-learn's 1797 8x8 handwritten digits, upscaled by an integer factor and padded.

    Pixel values 0..16 map to round(v * 255 / 16); each pixel becomes a k x k block with
    k = resolution // 8, and the result is zero-padded (centred) to resolution.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"digits are 8x8: resolution must be >= 8, got {resolution}")
    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # [N,8,8]
    k = resolution // 8
    images = images.repeat(k, axis=1).repeat(k, axis=2)
    pad = resolution - 8 * k
    images = np.pad(images, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    images = np.repeat(images[..., None], channels, axis=-1)
    labels = bunch.target.astype(np.int32)
    return ArraySource(
        images,
        labels,
        resolution=resolution,
        channels=channels,
        use_labels=use_labels,
        name="digits",
    )


def _existing(path, kind: str) -> Path:
    """Path that must exist, else FileNotFoundError naming it."""
    if path is None or str(path) == "":
        raise ValueError(f"data.path must be set for a {kind!r} dataset")
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"{kind} dataset path does not exist: {path}")
    return path


def _is_image(name: str) -> bool:
    """Whether a file name has a supported image extension."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stamp(path: Path) -> list[int]:
    """[size, mtime_ns] of a file: changes when the file is rewritten."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _verified_path(key: str) -> Path:
    """Cache file recording which images of a dataset were verified."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edm_jax" / "verified" / (hashlib.sha1(key.encode()).hexdigest() + ".json")


def _read_verified(key: str) -> dict:
    """{name: stamp} of images verified before (empty if none or unreadable)."""
    try:
        return json.loads(_verified_path(key).read_text())
    except (OSError, ValueError):
        return {}


def _write_verified(key: str, stamps: dict) -> None:
    """Record verified images (best effort: a read-only cache only costs time)."""
    path = _verified_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, path)
    except OSError:
        pass


def _verify_images(names: list[str], read: Callable[[str], bytes | Path], where: str,
                   resolution: int) -> None:  # fmt: skip
    """Decode each named image once (progress bar when many); errors name the file."""
    from tqdm.auto import tqdm

    bar = tqdm(names, desc=f"checking images in {where}", unit="img", disable=len(names) < 500)
    for name in bar:
        data = read(name)
        verify_image(data, resolution, str(data) if isinstance(data, Path) else f"{where}:{name}")


def _edm_labels(raw: bytes | None, fnames: list[str], where: str):
    """Labels from an EDM dataset.json ({'labels': [[fname, label], ...] | null}) or None."""
    if raw is None:
        return None
    try:
        table = json.loads(raw).get("labels")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{where}: dataset.json is not valid EDM labels JSON: {e}") from e
    if table is None:
        return None
    table = {str(k).replace("\\", "/"): v for k, v in table}
    missing = [f for f in fnames if f not in table]
    if missing:
        raise ValueError(f"{where}: dataset.json has no label for {missing[0]} ({len(missing)})")
    labels = [table[f] for f in fnames]
    if any(isinstance(v, (list, tuple)) or v is None for v in labels):
        raise ValueError(f"{where}: only integer class labels are supported in dataset.json")
    return np.asarray(labels, np.int64)


class FolderSource(ImageSource):
    """Images under a folder (recursive). Labels: dataset.json if present, else subfolders."""

    def __init__(self, path, *, resolution, channels, use_labels):
        root = _existing(path, "folder")
        if not root.is_dir():
            raise ValueError(f"folder dataset path is not a directory: {root} (use name='zip'?)")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        self._fnames = [f for f in files if _is_image(f)]
        if not self._fnames:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self._root, self.resolution, self.channels = root, int(resolution), int(channels)
        key = f"folder:{root.absolute()}:{self.resolution}"
        stamps = {f: _stamp(root / f) for f in self._fnames}
        seen = _read_verified(key)
        todo = [f for f in self._fnames if seen.get(f) != stamps[f]]
        _verify_images(todo, lambda f: root / f, str(root), self.resolution)
        if todo:
            _write_verified(key, stamps)
        meta = root / "dataset.json"
        labels = _edm_labels(meta.read_bytes() if meta.exists() else None, self._fnames, str(root))
        if labels is None and use_labels:
            labels = self._folder_labels(root)
        self._set_labels(labels, use_labels, str(root))

    def _folder_labels(self, root: Path):
        """Class ids from the first path component (sorted subfolder names)."""
        loose = [f for f in self._fnames if "/" not in f]
        if loose:
            raise ValueError(
                f"use_labels=True but {root} has images outside class subfolders "
                f"(e.g. {loose[0]}); put every image in <class>/ or set use_labels=False"
            )
        self.class_names = sorted({f.split("/")[0] for f in self._fnames})
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.asarray([index[f.split("/")[0]] for f in self._fnames], np.int64)

    def __len__(self) -> int:
        """Number of images."""
        return len(self._fnames)

    def _image(self, index: int) -> np.ndarray:
        """Decoded, fitted image `index`."""
        path = self._root / self._fnames[index]
        return decode_image(path, self.resolution, self.channels, str(path))


class ZipSource(ImageSource):
    """An NVlabs/edm dataset zip (dataset_tool.py output): images + optional dataset.json."""

    def __init__(self, path, *, resolution, channels, use_labels):
        self._path = _existing(path, "zip")
        if not zipfile.is_zipfile(self._path):
            raise ValueError(f"not a zip file: {self._path}")
        self._zip = None
        self.resolution, self.channels = int(resolution), int(channels)
        names = set(self._file().namelist())
        self._fnames = sorted(n for n in names if _is_image(n))
        if not self._fnames:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self._path}")
        key = f"zip:{self._path.absolute()}:{self.resolution}"
        stamp = {"zip": _stamp(self._path)}
        if _read_verified(key) != stamp:
            _verify_images(self._fnames, self._file().read, str(self._path), self.resolution)
            _write_verified(key, stamp)
        raw = self._file().read("dataset.json") if "dataset.json" in names else None
        self._set_labels(_edm_labels(raw, self._fnames, str(self._path)), use_labels, str(path))

    def _file(self) -> zipfile.ZipFile:
        """The zip handle, opened lazily (once per process)."""
        if self._zip is None:
            self._zip = zipfile.ZipFile(self._path)
        return self._zip

    def __getstate__(self) -> dict:
        """Pickle without the open zip handle (for worker processes)."""
        return {**self.__dict__, "_zip": None}

    def __len__(self) -> int:
        """Number of images."""
        return len(self._fnames)

    def _image(self, index: int) -> np.ndarray:
        """Decoded, fitted image `index`."""
        name = self._fnames[index]
        data = self._file().read(name)
        return decode_image(data, self.resolution, self.channels, f"{self._path}:{name}")


def cache_in_memory(source: ImageSource, chunk: int = 1024) -> ArraySource:
    """Decode every image once into RAM (uint8 N*R*R*C bytes): no decoding while training."""
    n, shape = len(source), (source.resolution, source.resolution, source.channels)
    images, labels = np.empty((n, *shape), np.uint8), np.empty(n, np.int32)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        images[idx], labels[idx] = source.get_batch(idx)
    labeled = source.num_classes > 0
    cached = ArraySource(
        images,
        labels if labeled else None,
        resolution=source.resolution,
        channels=source.channels,
        use_labels=labeled,
        name=f"cached {source!r}",
    )
    cached.num_classes = source.num_classes  # declared classes may exceed the largest label
    cached.class_names = source.class_names
    return cached
