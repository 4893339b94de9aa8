"""edm_jax.sharding: the one mesh (axis 'data') of training, sampling, metrics and the dataset
tool, and what it is on one device (training: a mesh; sampling and metrics: none)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from edm_jax import sharding


def test_training_mesh_spans_the_given_devices_even_one():
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py: 8 CPU devices
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.tolist() == devices
    one = sharding.make_mesh(devices[:1])
    assert one.axis_names == ("data",) and one.devices.tolist() == devices[:1]


def test_batch_mesh_only_when_the_batch_splits_over_two_or_more_devices(monkeypatch):
    mesh = sharding.batch_mesh(16)
    assert mesh is not None and mesh.axis_names == ("data",)
    assert mesh.devices.tolist() == jax.local_devices()
    assert sharding.batch_mesh(4) is None  # 4 rows over 8 devices: no split, no placement
    assert sharding.batch_mesh(12) is None
    single = jax.local_devices()[:1]
    monkeypatch.setattr(jax, "local_devices", lambda: single)
    assert sharding.batch_mesh(16) is None  # one device: arrays stay where they are


def test_place_splits_or_replicates_on_a_mesh_and_leaves_the_tree_without_one():
    x = jnp.arange(16.0).reshape(16, 1)
    assert sharding.place(x, None, sharding.BATCH) is x
    mesh = sharding.batch_mesh(16)
    split = sharding.place(x, mesh, sharding.BATCH)
    assert split.sharding == NamedSharding(mesh, PartitionSpec("data"))
    assert {s.data.shape for s in split.addressable_shards} == {(2, 1)}
    rep = sharding.place({"w": x}, mesh, sharding.REPLICATED)["w"]
    assert {s.data.shape for s in rep.addressable_shards} == {(16, 1)}
    np.testing.assert_array_equal(np.asarray(split), np.asarray(x))
