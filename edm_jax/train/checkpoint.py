"""Checkpoints with orbax: state, data position, config and model spec, checked on resume.

Each checkpoint is a step folder under ``<workdir>/checkpoints`` with four items:
``state`` (the TrainState pytree: params, EMAs, optimizer state, step, rng), ``data``
(the input pipeline's JSON state), ``config`` (the resolved config) and ``model_spec``
(everything ``build_model`` needs, so readers need no training code). Orbax writes to a
temporary folder and renames it when complete (atomic), asynchronously; once a step has
committed, ``sha256.json`` records the SHA-256 of each of its files. The last ``keep``
checkpoints are kept, plus every one whose step is a multiple of ``keep_period``.

On resume the newest step is verified against its checksums and restored; a step that
cannot be read is moved aside (renamed ``<step>.unreadable-<time>``, never deleted) with
one warning, and the one before is used. A config that changed in a key that shapes the
training state is refused (see ``config_changes``). A failed save raises
CheckpointSaveError naming the folder and the free disk space.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from edm_jax.checkpoints import (
    SPEC_ITEM,
    committed_steps,
    quiet_orbax,
    read_json_item,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "CheckpointSaveError",
    "Checkpointer",
    "ConfigChangedError",
    "abstract_state",
    "config_changes",
]

log = logging.getLogger(__name__)

# Keys that may change on resume: they change neither the state nor the sample order.
SAFE_PREFIXES = ("log.", "eval.", "metrics.")
SAFE_KEYS = (
    "train.total_kimg", "train.remat", "train.fsdp", "train.fsdp_min_size",
    "data.num_workers", "data.cache", "data.path", "data.tfds_data_dir",
)  # fmt: skip


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions): the run stops."""


class ConfigChangedError(ValueError):
    """The config changed, on resume, in a key that shapes the training state."""


def abstract_state(state_shape: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for orbax to restore into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, shardings
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested JSON dict."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) 'key: old -> new' lines between a checkpoint's config and a new one.

    Keys only one side has (added by a newer version) are not compared.
    """
    a, b = _flatten(old), _flatten(new)
    refused: list[str] = []
    allowed: list[str] = []
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key]:
            continue
        line = f"{key}: {a[key]!r} -> {b[key]!r}"
        safe = key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)
        (allowed if safe else refused).append(line)
    return refused, allowed


def _free_space(path: Path) -> str:
    """Free space on the disk holding path, e.g. '1.2 GiB free'."""
    for p in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(p).free / 2**30:.2f} GiB free"
        except OSError:
            continue
    return "free space unknown"


class Checkpointer:
    """A CheckpointManager for one run directory (see module docstring)."""

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, keep_period: int = 0, use_async: bool = True
    ):
        quiet_orbax()
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", SPEC_ITEM)
        )
        self._pending: list[int] = []  # started saves whose manifest is not written yet
        self.last_saved: int | None = None

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def _save_error(self, step: int | str, e: BaseException) -> CheckpointSaveError:
        """One line naming the folder, the error and the free space."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory} failed "
            f"({type(e).__name__}: {first:.200}); {_free_space(self.directory)}"
        )

    def save(self, step: int, state: Any, data_state: dict, config_json: str, spec: dict) -> bool:
        """Start saving (async); returns whether a save was started."""
        self.finish()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json)),
            **{SPEC_ITEM: ocp.args.JsonSave(spec)},
        )
        try:
            started = self.manager.save(int(step), args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failed write stops the run with one line
            raise self._save_error(step, e) from e
        if started:
            self._pending.append(int(step))
            self.last_saved = int(step)
        return started

    def check(self) -> None:
        """Raise CheckpointSaveError now if a background save failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending[-1] if self._pending else "", e) from e

    def finish(self) -> None:
        """Wait for pending saves, then write their checksum manifests (primary host)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending[-1] if self._pending else "", e) from e
        pending, self._pending = self._pending, []
        if jax.process_index() != 0:
            return
        for step in pending:
            step_dir = self.directory / str(step)
            if step_dir.is_dir():
                try:
                    write_manifest(step_dir)
                except OSError as e:
                    raise self._save_error(step, e) from e

    def _move_aside(self, step: int, reason: str) -> None:
        """Rename an unreadable step folder (never delete it) and warn once."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        msg = f"checkpoint {src} is unreadable ({reason:.300}); moved to {dst.name}, using the one before"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        self.manager.reload()

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"]

    def _checked_config(self, step: int, config: dict | None) -> list[str] | None:
        """Allowed changes vs the step's config; None if its config is unreadable."""
        try:
            old = read_json_item(self.directory / str(step), "config")
        except (OSError, ValueError):
            return None
        if config is None:
            return []
        refused, allowed = config_changes(old, config)
        if refused:
            raise ConfigChangedError(
                f"the config differs from the one of checkpoint {self.directory / str(step)} in "
                f"keys that shape the training state: {'; '.join(refused)}. Restore these "
                "values to resume, or train in a new --workdir"
            )
        return allowed

    def restore_latest(
        self, target: Any, config: dict | None = None
    ) -> tuple[int, Any, dict, list[str]] | None:
        """(step, state, data_state, allowed config changes) of the newest readable step.

        None if there is none. Unreadable steps are moved aside; `config` (a JSON dict) is
        compared with the step's and ConfigChangedError raised on a refused change.
        """
        for step in reversed(committed_steps(self.directory)):
            problem = verify_manifest(self.directory / str(step))
            allowed = None if problem else self._checked_config(step, config)
            if problem is None and allowed is None:
                problem = "its config item is unreadable"
            if problem is None:
                try:
                    state, data_state = self._restore_step(step, target)
                    return step, state, data_state, allowed or []
                except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: move aside
                    problem = repr(e)
            self._move_aside(step, problem)
        return None

    def read_config(self, step: int) -> dict:
        """The resolved config stored with checkpoint `step`."""
        return dict(read_json_item(self.directory / str(step), "config"))

    def reached_preemption(self, step: int) -> bool:
        """Whether all hosts agreed that a preemption notice arrived (multi-host sync point)."""
        return bool(self.manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Block until pending async saves are committed (and their manifests written)."""
        self.finish()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        try:
            self.finish()
        finally:
            self.manager.close()
