"""`load_source(config.data)`: pick and build a dataset source from a config mapping."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from edm_jax.checks import did_you_mean
from edm_jax.data.sources import (
    FolderSource,
    ImageSource,
    ZipSource,
    cache_in_memory,
    digits_source,
    npz_source,
)
from edm_jax.data.tfds_source import TfdsSource

__all__ = ["PATH_SOURCES", "SOURCES", "describe_source", "load_source"]


def _digits(cfg: Mapping, **kw) -> ImageSource:
    """scikit-learn's bundled digits (no download)."""
    return digits_source(**kw)


def _tfds(cfg: Mapping, **kw) -> ImageSource:
    """A tfds dataset by name (tfds_name, split, tfds_data_dir)."""
    name, data_dir = cfg.get("tfds_name"), cfg.get("tfds_data_dir") or None
    return TfdsSource(name, split=cfg.get("split") or "train", data_dir=data_dir, **kw)


def _folder(cfg: Mapping, **kw) -> ImageSource:
    """An image folder (path)."""
    return FolderSource(cfg.get("path"), **kw)


def _zip(cfg: Mapping, **kw) -> ImageSource:
    """An NVlabs/edm dataset zip (path)."""
    return ZipSource(cfg.get("path"), **kw)


def _npz(cfg: Mapping, **kw) -> ImageSource:
    """A .npz of uint8 images and optional labels (path)."""
    return npz_source(cfg.get("path"), **kw)


def _latents(cfg: Mapping, **kw):
    """VAE latents written by `python -m edm_jax.data.tool --encoder ...` (path)."""
    from edm_jax.data.latent_source import LatentSource

    return LatentSource(cfg.get("path"), use_labels=kw["use_labels"])


SOURCES: dict[str, Callable[..., ImageSource]] = {
    "digits": _digits,
    "tfds": _tfds,
    "folder": _folder,
    "zip": _zip,
    "npz": _npz,
    "latents": _latents,
}


PATH_SOURCES = ("folder", "zip", "npz", "latents")  # the sources that read data.path


def _source_name(data_cfg: Mapping) -> str:
    """data.name checked against data.path: a path only where it is read; folder vs zip by it."""
    name, path = data_cfg.get("name"), str(data_cfg.get("path") or "")
    if name not in SOURCES:
        raise ValueError(f"unknown data.name {name!r}{did_you_mean(name, SOURCES)}; "
                         f"valid: {sorted(SOURCES)}")  # fmt: skip
    if path and name not in PATH_SOURCES:
        raise ValueError(
            f"config.data.path={path!r} is not read by data.name={name!r}; set data.name to "
            f"one of {list(PATH_SOURCES)} (an image folder or an NVlabs/edm zip: 'folder' or "
            "'zip', told apart by the path), or drop data.path"
        )
    if name in ("folder", "zip") and path:  # the path says which it is
        if os.path.isdir(path):
            return "folder"
        if path.lower().endswith(".zip"):
            return "zip"
    return name


def describe_source(source: ImageSource, data_cfg: Mapping) -> str:
    """The one start line: source, path, image count, classes (with names), shape."""
    name, path = data_cfg.get("name"), data_cfg.get("path") or ""
    where = f" {path}" if path else ""
    names = list(getattr(source, "class_names", None) or [])
    if source.num_classes:
        shown = names[:10] + (["..."] if len(names) > 10 else [])
        classes = f"{source.num_classes} classes" + (f" ({', '.join(shown)})" if names else "")
    else:
        classes = "unlabelled"
    r = source.resolution
    return f"data: {name}{where}: {len(source)} images, {classes}, {r}x{r}x{source.channels}"


def load_source(data_cfg: Mapping) -> ImageSource:
    """Build the source named by data_cfg['name'] at data_cfg['resolution'] / ['channels'].

    Optional keys: 'cache' (decode everything into RAM once), 'split', 'tfds_data_dir'.
    'folder' and 'zip' are told apart by the path (a directory or a .zip file); a data.path
    that the named source does not read is an error.
    """
    name = _source_name(data_cfg)
    resolution, channels = data_cfg.get("resolution"), data_cfg.get("channels", 3)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"data.resolution must be a positive int, got {resolution!r}")
    if channels not in (1, 3) and name != "latents":
        raise ValueError(f"data.channels must be 1 or 3, got {channels!r}")
    use_labels = bool(data_cfg.get("use_labels", False))
    source = SOURCES[name](
        data_cfg, resolution=resolution, channels=channels, use_labels=use_labels
    )
    if name == "latents":
        return source
    return cache_in_memory(source) if data_cfg.get("cache", False) else source
