"""Grain input pipeline: seeded global shuffle, infinite epochs, per-host shards, resumable.

The stream is one global order of examples: epoch ``e`` is a permutation of the
source seeded by ``(seed, e)`` (numpy, computed once per epoch in each process). Global batch ``k``
is positions ``[k*G, (k+1)*G)`` of that order and host ``i`` of ``S`` takes the
contiguous slice ``[k*G + i*b, k*G + (i+1)*b)``, ``b = G/S``: hosts see disjoint data,
together exactly the global batch, which does not depend on the number of hosts. That
slice is what ``jax.make_array_from_process_local_data`` expects of each process.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain
import jax
import numpy as np

__all__ = ["DataPipeline", "make_pipeline", "to_global"]


_STREAM_LENGTH = 2**50  # "infinite": sys.maxsize breaks grain's worker slicing


class _HostBatches(grain.MapDataset):
    """This host's batches, infinitely. Batch k holds global stream positions
    [k*G + i*b, k*G + (i+1)*b); position p is record perm_e[p mod L] of epoch e = p // L,
    perm_e a permutation seeded by (seed, e), computed once per epoch and process."""

    def __init__(self, source, *, seed, epoch_length, global_batch, shard):
        super().__init__([])
        self._source, self._seed, self._n = source, seed, len(source)
        self._epoch_length, self._global_batch = epoch_length, global_batch
        self._shard_index, self._shard_count = shard
        self._b = global_batch // self._shard_count
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Practically infinite."""
        return _STREAM_LENGTH // self._b

    def __str__(self) -> str:
        """Name shown in grain's debugging output."""
        return f"HostBatches(seed={self._seed}, shard={self._shard_index}/{self._shard_count})"

    def _perm(self, epoch: int) -> np.ndarray:
        """Record order of one epoch, cached per process (thread-safe: the cache dict is
        only ever replaced whole; prefetch threads may at worst compute one twice)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
            perm = rng.permutation(self._n).astype(np.int64)
            kept = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms = {**kept, epoch: perm}
        return perm

    def record_indices(self, k: int) -> np.ndarray:
        """Source indices of this host's batch k: int64 [b]."""
        start = k * self._global_batch + self._shard_index * self._b
        epoch, r = np.divmod(np.arange(start, start + self._b), self._epoch_length)
        out = np.empty(self._b, np.int64)
        for e in np.unique(epoch):
            out[epoch == e] = self._perm(int(e))[r[epoch == e]]
        return out

    def __getitem__(self, index):
        """This host's batch number `index`: {'image': float32 [b,H,W,C], 'label': int32 [b]}."""
        if isinstance(index, slice):
            return self.slice(index)
        indices = self.record_indices(int(index))
        get_batch = getattr(self._source, "get_batch", None)
        if get_batch is not None:
            images, labels = get_batch(indices)
        else:  # any grain-style source of {'image', 'label'} records
            records = [self._source[int(i)] for i in indices]
            images = np.stack([r["image"] for r in records])
            labels = np.asarray([r["label"] for r in records], np.int32)
        if getattr(self._source, "is_latent", False):  # raw latents (mean, std): as stored
            return {"image": images.astype(np.float32), "label": labels.astype(np.int32)}
        images = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
        return {"image": images, "label": labels.astype(np.int32)}


class DataPipeline:
    """Iterator of host-local batches with checkpointable state (get_state / set_state).

    The state is the number of batches delivered, so it does not depend on num_workers
    or prefetching: a run may resume with other loader settings and get the same batches.
    """

    def __init__(self, make_iter, *, source, global_batch_size, local_batch_size, epoch_length):
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.steps_per_epoch = epoch_length // global_batch_size
        self._make_iter = make_iter  # start batch -> grain iterator
        self._iter = make_iter(0)
        self._next = 0

    def __iter__(self) -> DataPipeline:
        """The pipeline is its own iterator."""
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """Next host-local batch {'image': float32 [b,H,W,C], 'label': int32 [b]}."""
        batch = next(self._iter)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position of the iterator: {'next_batch': k}."""
        return {"next_batch": self._next}

    def set_state(self, state: dict) -> None:
        """Resume from get_state's dict (same source, seed and sharding; any num_workers)."""
        if "next_batch" not in state:  # written by an older version: grain's own state
            self._iter.set_state(state)
            return
        self.close()
        self._next = int(state["next_batch"])
        self._iter = self._make_iter(self._next)

    def close(self) -> None:
        """Stop worker processes, if any."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def _watch_parent(worker_index: int, worker_count: int) -> None:
    """grain worker init: exit when the parent dies (SIGKILL leaves no one to stop us)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _ensure_absl_flags() -> None:
    """grain's worker processes read absl flags; outside absl.app they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_args(n, global_batch_size, seed, shard_index, shard_count, drop_remainder):
    """Validate make_pipeline's arguments before building anything."""
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"shard_count={shard_count}"
        )
    if n == 0:
        raise ValueError("the data source is empty")
    if drop_remainder and n < global_batch_size:
        raise ValueError(
            f"dataset has {n} examples, fewer than global_batch_size={global_batch_size}; "
            "use a smaller batch or drop_remainder=False"
        )


def make_pipeline(
    source,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    drop_remainder: bool = True,
) -> DataPipeline:
    """Infinite, globally shuffled, host-sharded batches of `source` (see module docstring).

    drop_remainder=True truncates each epoch to a multiple of global_batch_size so no
    batch spans two epochs; False makes the stream continuous across epochs.
    num_workers > 0 decodes in that many worker processes (grain mp_prefetch).
    """
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    n = len(source)
    _check_args(n, global_batch_size, seed, shard_index, shard_count, drop_remainder)
    b = global_batch_size // shard_count
    epoch_length = (n // global_batch_size) * global_batch_size if drop_remainder else n
    ds = _HostBatches(
        source,
        seed=int(seed),
        epoch_length=epoch_length,
        global_batch=global_batch_size,
        shard=(shard_index, shard_count),
    )
    threads, buffer = (2, 2) if num_workers > 0 else (8, 8)  # per process

    def make_iter(start: int) -> grain.DatasetIterator:
        """Iterator over this host's batches start, start+1, ..."""
        part = ds if start == 0 else ds.slice(slice(start, None))
        it = part.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
        )
        if num_workers > 0:
            _ensure_absl_flags()
            options = grain.MultiprocessingOptions(num_workers=num_workers)
            it = it.mp_prefetch(options, worker_init_fn=_watch_parent)
        return iter(it)

    return DataPipeline(
        make_iter,
        source=source,
        global_batch_size=global_batch_size,
        local_batch_size=b,
        epoch_length=max(epoch_length, global_batch_size),
    )


def _sharding_for(sharding, key: str, ndim: int):
    """The sharding of one batch entry: a dict entry, or a NamedSharding cut to ndim."""
    if isinstance(sharding, Mapping):
        return sharding[key]
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)[:1] + (None,) * (ndim - 1)
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:ndim]))
    return sharding


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays sharded along the batch axis.

    `sharding` is a NamedSharding whose first spec entry shards the batch (reused for
    every entry, whatever its rank), or a dict of shardings keyed like `batch`.
    """
    return {
        k: jax.make_array_from_process_local_data(_sharding_for(sharding, k, np.ndim(v)), v)
        for k, v in batch.items()
    }
