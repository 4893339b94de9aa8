"""The one device mesh of the package: 1-D, axis ``data``, batches split along it.

``make_mesh(devices)`` is the training mesh: every device of every host by default, and a
mesh even on one device, since the train state's shardings (``train.step.state_sharding``)
and the dataset tool's jitted encoder are built on it. ``batch_mesh(batch)`` is the sampling and metrics mesh: this host's
devices when the batch splits evenly over them, else None; on a single device it is None
too, and arrays stay where they are (a mesh of one device would only add a copy). ``place``
puts a pytree on a mesh with a PartitionSpec (as it is without a mesh).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BATCH", "DATA_AXIS", "REPLICATED", "batch_mesh", "make_mesh", "place"]

DATA_AXIS = "data"
BATCH = PartitionSpec(DATA_AXIS)  # leading (batch) axis split over the devices
REPLICATED = PartitionSpec()


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """1-D Mesh named 'data' over the given devices (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_mesh(batch: int) -> Mesh | None:
    """make_mesh over this host's devices when batch splits evenly over two or more of them;
    None otherwise (one device, or an uneven batch: no placement)."""
    devices = jax.local_devices()
    if len(devices) < 2 or batch % len(devices):
        return None
    return make_mesh(devices)


def place(tree: Any, mesh: Mesh | None, spec: PartitionSpec) -> Any:
    """tree put on the mesh with spec (batch-split or replicated); as it is without a mesh."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, spec))
