"""`load_source(config.data)`: pick and build a dataset source from a config mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from edm_jax.data.sources import (
    FolderSource,
    ImageSource,
    ZipSource,
    cache_in_memory,
    digits_source,
    npz_source,
)
from edm_jax.data.tfds_source import TfdsSource

__all__ = ["SOURCES", "load_source"]


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


def load_source(data_cfg: Mapping) -> ImageSource:
    """Build the source named by data_cfg['name'] at data_cfg['resolution'] / ['channels'].

    Optional keys: 'cache' (decode everything into RAM once), 'split', 'tfds_data_dir'.
    """
    name = data_cfg.get("name")
    if name not in SOURCES:
        raise ValueError(f"unknown data.name {name!r}; valid: {sorted(SOURCES)}")
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
