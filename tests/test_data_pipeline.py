"""Grain pipeline: exact values, epochs, global shuffle, host shards, resume, to_global."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edm_jax.data import ArraySource, make_pipeline, to_global


def _source(n=50, res=4):
    """Image i is filled with value i (uint8) and has label i: batches name their examples."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, res, res, 1))
    return ArraySource(images, np.arange(n), resolution=res, channels=1, use_labels=True)


def _ids(batch):
    """Example ids of a batch, checked against its pixels."""
    ids = batch["label"]
    want = ids[:, None, None, None].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(batch["image"], np.broadcast_to(want, batch["image"].shape))
    return ids.tolist()


def _take(pipe, k):
    """k batches' ids."""
    return [_ids(next(pipe)) for _ in range(k)]


def test_batches_are_exact_and_scaled():
    pipe = make_pipeline(_source(), global_batch_size=10, seed=0, shard_index=0, shard_count=1)
    batch = next(pipe)
    assert batch["image"].shape == (10, 4, 4, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    src = ArraySource(
        np.array([[[[0]], [[255]]]], np.uint8).reshape(1, 1, 2, 1).repeat(2, 1),
        resolution=2,
        channels=1,
        use_labels=False,
    )
    b = next(make_pipeline(src, global_batch_size=1, seed=0, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(b["image"][0, 0, :, 0], [-1.0, 1.0])
    np.testing.assert_array_equal(b["label"], [0])


def test_epochs_cover_data_and_reshuffle():
    pipe = make_pipeline(_source(), global_batch_size=10, seed=1, shard_index=0, shard_count=1)
    epochs = [sum(_take(pipe, 5), []) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))
    again = make_pipeline(_source(), global_batch_size=10, seed=1, shard_index=0, shard_count=1)
    other = make_pipeline(_source(), global_batch_size=10, seed=2, shard_index=0, shard_count=1)
    assert sum(_take(again, 5), []) == epochs[0] != sum(_take(other, 5), [])


def test_drop_remainder_truncates_each_epoch():
    kw = dict(global_batch_size=10, seed=3, shard_index=0, shard_count=1)
    pipe = make_pipeline(_source(53), drop_remainder=True, **kw)
    assert pipe.steps_per_epoch == 5
    for _ in range(3):
        epoch = sum(_take(pipe, 5), [])
        assert len(set(epoch)) == 50  # 50 distinct of 53, no batch spans epochs
    cont = make_pipeline(_source(53), drop_remainder=False, **kw)
    stream = sum(_take(cont, 11), [])
    assert sorted(stream[:53]) == list(range(53)) and sorted(stream[53:106]) == list(range(53))


def test_two_hosts_split_the_global_batch():
    kw = dict(global_batch_size=10, seed=4, drop_remainder=False)
    single = make_pipeline(_source(), shard_index=0, shard_count=1, **kw)
    hosts = [make_pipeline(_source(), shard_index=i, shard_count=2, **kw) for i in (0, 1)]
    assert hosts[0].local_batch_size == 5
    seen = [[], []]
    for _ in range(10):  # two epochs
        whole = _ids(next(single))
        parts = [_ids(next(h)) for h in hosts]
        assert parts[0] + parts[1] == whole and not set(parts[0]) & set(parts[1])
        seen[0] += parts[0]
        seen[1] += parts[1]
    first_epoch = seen[0][:25] + seen[1][:25]
    assert sorted(first_epoch) == list(range(50))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted(num_workers):
    kw = dict(global_batch_size=8, seed=5, shard_index=1, shard_count=2, num_workers=num_workers)
    ref = make_pipeline(_source(), **kw)
    uninterrupted = _take(ref, 20)
    ref.close()
    first = make_pipeline(_source(), **kw)
    head = _take(first, 7)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
    first.close()
    resumed = make_pipeline(_source(), **kw)
    resumed.set_state(state)
    tail = _take(resumed, 13)
    resumed.close()
    assert head + tail == uninterrupted


def test_to_global_shards_batch_over_devices():
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    n = 2 * len(devices)
    batch = next(make_pipeline(_source(), global_batch_size=n, seed=0))
    out = to_global(batch, sharding)
    assert out["image"].shape == (n, 4, 4, 1) and out["label"].shape == (n,)
    assert out["image"].sharding.spec == PartitionSpec("data", None, None, None)
    assert len(out["label"].addressable_shards) == len(devices)
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])


def test_bad_pipeline_arguments():
    with pytest.raises(ValueError, match="multiple of shard_count=3"):
        make_pipeline(_source(), global_batch_size=10, seed=0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make_pipeline(_source(), global_batch_size=10, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="seed must be"):
        make_pipeline(_source(), global_batch_size=10, seed=-1)
    with pytest.raises(ValueError, match="fewer than global_batch_size=64"):
        make_pipeline(_source(), global_batch_size=64, seed=0)
