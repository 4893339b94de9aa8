"""Datasets (tfds, image folders, EDM zips, arrays, digits), the grain pipeline, EDM augmentation."""

from edm_jax.data.augment import augment, augment_dim, hflip
from edm_jax.data.load import SOURCES, load_source
from edm_jax.data.pipeline import DataPipeline, make_pipeline, to_global
from edm_jax.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    ZipSource,
    cache_in_memory,
    digits_source,
    npz_source,
)
from edm_jax.data.tfds_source import TfdsSource

__all__ = [
    "SOURCES",
    "ArraySource",
    "DataPipeline",
    "FolderSource",
    "ImageSource",
    "TfdsSource",
    "ZipSource",
    "augment",
    "augment_dim",
    "cache_in_memory",
    "digits_source",
    "hflip",
    "load_source",
    "make_pipeline",
    "npz_source",
    "to_global",
]
