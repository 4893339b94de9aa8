"""TensorFlow Datasets images read through ``tfds`` ArrayRecord data sources (no TensorFlow).

Reading a prepared dataset needs only ``tensorflow-datasets`` and ``array-record``.
Preparing one for the first time (download + conversion, done once per ``data_dir``)
may need TensorFlow; install both with ``pip install 'edm_jax[tfds]'``.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

from edm_jax.data.images import check_size, fit_array
from edm_jax.data.sources import ImageSource

__all__ = ["TfdsSource"]

_EXTRA = "pip install 'edm_jax[tfds]'"


def _import_tfds():
    """tensorflow_datasets, or an ImportError pointing at the [tfds] extra."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"tfds datasets need tensorflow-datasets and array-record: {_EXTRA}"
        ) from e
    return tfds


def _builder(tfds, name: str, data_dir):
    """tfds builder for `name`; unknown names get a ValueError with close matches."""
    if not name:
        raise ValueError("data.tfds_name must be set for name='tfds' (e.g. 'cifar10')")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(
            name, tfds.list_builders(with_community_datasets=False), n=5
        )
        raise ValueError(
            f"unknown tfds dataset {name!r}; close matches: {close or 'none'} "
            "(catalogue: https://www.tensorflow.org/datasets/catalog/overview)"
        ) from None


def _prepare(builder) -> None:
    """Download and convert to ArrayRecord once; missing TensorFlow -> a pointed error."""
    try:
        builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as e:
        raise RuntimeError(
            f"preparing tfds dataset {builder.name!r} needs {_missing_module(e)} "
            f"(usually TensorFlow): {_EXTRA}, or prepare it once elsewhere with "
            f"file_format='array_record' and point data.tfds_data_dir at it"
        ) from e
    except Exception as e:
        raise RuntimeError(
            f"could not prepare tfds dataset {builder.name!r} in {builder.data_dir}: {e} "
            f"(first use downloads it and may need TensorFlow: {_EXTRA})"
        ) from e


def _missing_module(error: BaseException | None) -> str:
    """Name of the module a (possibly re-raised) ModuleNotFoundError is about."""
    while error is not None:
        if isinstance(error, ImportError) and error.name:
            return error.name
        found = re.search(r"No module named '([^']+)'", str(error))
        if found:
            return found.group(1)
        error = error.__cause__
    return "a missing module"


def _feature_keys(tfds, features) -> tuple[str, str | None, int]:
    """(image key, ClassLabel key or None, num classes) of a tfds FeaturesDict."""
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise ValueError(f"tfds dataset has no Image feature: {list(features.keys())}")
    image_key = "image" if "image" in images else images[0]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    label_key = "label" if "label" in labels else (labels[0] if labels else None)
    n = features[label_key].num_classes if label_key else 0
    return image_key, label_key, n


class TfdsSource(ImageSource):
    """A tfds dataset split, e.g. TfdsSource('cifar10', split='train', ...)."""

    def __init__(self, name, *, split="train", data_dir=None, resolution, channels, use_labels):
        tfds = _import_tfds()
        builder = _builder(tfds, name, data_dir)
        if not builder.is_prepared():
            _prepare(builder)
        self._image_key, self._label_key, n = _feature_keys(tfds, builder.info.features)
        try:
            self._ds = builder.as_data_source(split=split)
        except ValueError as e:
            raise ValueError(f"tfds dataset {name!r}, split {split!r}: {e}") from e
        except NotImplementedError as e:  # prepared as TFRecord: no random access
            raise ValueError(
                f"tfds dataset {name!r} in {builder.data_dir} is not in ArrayRecord format; "
                "re-prepare it with `tfds build --file_format=array_record` or a new data dir"
            ) from e
        self._name = f"tfds:{name}/{split}"
        self.resolution, self.channels = int(resolution), int(channels)
        shape = builder.info.features[self._image_key].shape  # (H, W, C), H/W may be None
        if shape[0] is not None and shape[1] is not None:
            check_size((shape[1], shape[0]), self.resolution, self._name)
        if len(self._ds) == 0:
            raise ValueError(f"{self._name} is empty")
        self._image(0)  # decode one record now: size/channel problems fail before training
        if use_labels and self._label_key is None:
            raise ValueError(f"use_labels=True but {self._name} has no ClassLabel feature")
        self._labels, self.num_classes = None, (n if use_labels else 0)

    def __len__(self) -> int:
        """Number of examples in the split."""
        return len(self._ds)

    def _image(self, index: int) -> np.ndarray:
        """Fitted image `index`."""
        return self._fit(self._ds[index][self._image_key])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """{'image': uint8 [R,R,C], 'label': int32} decoded from the ArrayRecord files."""
        n = len(self)
        if not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for {self._name} ({n} examples)")
        images, labels = self.get_batch(np.array([int(index) % n]))
        return {"image": images[0], "label": labels[0]}

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [b,R,R,C] and labels int32 [b], read in one ArrayRecord call."""
        records = self._ds.__getitems__([int(i) for i in indices])
        images = np.stack([self._fit(r[self._image_key]) for r in records])
        if not self.num_classes:
            return images, np.zeros(len(records), np.int32)
        return images, np.asarray([r[self._label_key] for r in records], np.int32)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """Fit one decoded image to resolution/channels."""
        return fit_array(image, self.resolution, self.channels, self._name)
