"""Checkpoints with orbax: state, data-iterator position and the resolved config.

Each checkpoint is a step folder under ``<workdir>/checkpoints`` with three items:
``state`` (the TrainState pytree: params, EMAs, optimizer state, step, rng), ``data``
(the input pipeline's JSON state) and ``config`` (the resolved config). Orbax writes to
a temporary folder and renames it when complete (atomic), asynchronously; the last
``keep`` checkpoints are kept, plus every one whose step is a multiple of ``keep_period``.
A newest checkpoint that cannot be read is skipped, with a warning, for the one before.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_state"]

log = logging.getLogger(__name__)


def abstract_state(state_shape: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for orbax to restore into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, shardings
    )


class Checkpointer:
    """A CheckpointManager for one run directory (see module docstring)."""

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, keep_period: int = 0, use_async: bool = True
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config_json: str) -> bool:
        """Start saving (async); returns whether a save was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json)),
        )
        return self.manager.save(int(step), args=args, force=True)

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"]

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest readable checkpoint, or None if none exist."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, data_state = self._restore_step(step, target)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                msg = f"checkpoint at step {step} in {self.directory} is unreadable ({e!r:.300})"
                warnings.warn(msg + "; falling back to the previous one", stacklevel=2)
                log.warning(msg)
                continue
            return step, state, data_state
        if steps:
            raise RuntimeError(f"no readable checkpoint among steps {steps} in {self.directory}")
        return None

    def read_config(self, step: int) -> dict:
        """The resolved config stored with checkpoint `step`."""
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"])

    def reached_preemption(self, step: int) -> bool:
        """Whether all hosts agreed that a preemption notice arrived (multi-host sync point)."""
        return bool(self.manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
