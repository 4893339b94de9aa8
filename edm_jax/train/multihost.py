"""Multi-host start-up: jax.distributed.initialize from flags or the environment.

Set ``--coordinator_address host:port --num_processes N --process_id i`` or the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; with
``auto=True`` jax detects SLURM / Open MPI / TPU clusters itself. On the CPU the
processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["host_copy", "maybe_initialize"]


def _env_int(name: str) -> int | None:
    """An integer environment variable, or None when unset."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Call jax.distributed.initialize when a multi-process run is configured; returns whether."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and n is None and not auto:
        return False
    if not auto and None in (address, n, pid):
        raise ValueError(
            "multi-process training needs coordinator_address, num_processes and process_id "
            f"(flags or JAX_* environment variables); got {address!r}, {n!r}, {pid!r}"
        )
    # CPU processes need cross-process collectives (no effect on GPU/TPU); set before any
    # call that starts a backend (jax.devices included).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    return True


def host_copy(tree, mesh: Mesh | None):
    """A NumPy copy on this host of a possibly sharded, possibly multi-host pytree (the EMA for
    grids and evaluations): gathered to every device of ``mesh`` first, then read locally."""
    if mesh is not None:
        tree = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
