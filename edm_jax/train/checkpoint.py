"""The trainer's checkpoint writer (orbax): saves, rotates and restores on resume.

Read-only access without the training stack (``edm_jax.load``) is ``edm_jax.checkpoint_reader``.

Each checkpoint is a step folder under ``<workdir>/checkpoints`` with four items:
``state`` (the TrainState pytree: params, EMAs, optimizer state, step, rng), ``data``
(the input pipeline's JSON state), ``config`` (the resolved config) and ``model_spec``
(everything ``build_model`` needs, so readers need no training code). Orbax writes to a
temporary folder and renames it when complete (atomic), asynchronously; ``sha256.json``,
the SHA-256 of each file of the step, is written into that temporary folder before the
rename, so a committed step always has it. The last ``keep`` checkpoints are kept, plus
every one whose step is a multiple of ``keep_period``.

On resume the config and the resolved model spec are compared with the newest step's
(every key of either side; ``config_changes``, ``spec_changes``): a change that shapes the
training state is refused (ConfigChangedError). A step whose saved arrays do not match the
state's structure is refused too (CheckpointMismatchError, naming the keys), and nothing
is renamed. Only a step that fails its checksums or cannot be read is corrupt: it is moved
aside (renamed ``<step>.unreadable-<time>``, never deleted) with one warning, and the one
before is used; a step without a manifest while an older one has one (a kill in an older
version's window) is moved aside as ``<step>.unverified-<time>``. If every step is
unreadable the run refuses to start (NoReadableCheckpointError). A failed save raises
CheckpointSaveError naming the folder and the free disk space.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from edm_jax.checkpoint_reader import (
    MANIFEST,
    SPEC_ITEM,
    committed_steps,
    quiet_orbax,
    read_json_item,
    verify_manifest,
    write_manifest,
)
from edm_jax.fileio import free_space
from edm_jax.nets.spec import resolved_spec

__all__ = [
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Checkpointer",
    "ConfigChangedError",
    "NoReadableCheckpointError",
    "abstract_state",
    "config_changes",
    "spec_changes",
    "structure_mismatches",
]


# Keys that may change on resume: they change neither the state nor the sample order.
SAFE_PREFIXES = ("log.", "eval.", "metrics.")
SAFE_KEYS = (
    "train.total_kimg", "train.remat", "train.fsdp", "train.fsdp_min_size", "train.gns",
    "data.num_workers", "data.cache", "data.path", "data.tfds_data_dir",
)  # fmt: skip


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions): the run stops."""


class ConfigChangedError(ValueError):
    """The config changed, on resume, in a key that shapes the training state."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's saved arrays do not match the structure of the state to restore."""


class NoReadableCheckpointError(ValueError):
    """Every checkpoint of the run was unreadable (moved aside): the run does not restart."""


def abstract_state(state_shape: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for orbax to restore into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, shardings
    )


UNSET = "<unset>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested JSON dict; an empty dict holds no key."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _with_defaults(old: dict) -> dict:
    """A checkpoint's config with the keys of default_config() it lacks (added since) filled."""
    from edm_jax.train.config_io import default_config

    filled = _flatten(json.loads(default_config().to_json()))
    free = ("model.net.", "model.precond_kwargs.", "loss.kwargs.")  # free-form: no defaults
    return {k: v for k, v in filled.items() if not k.startswith(free)} | _flatten(old)


def _differences(a: dict, b: dict) -> list[tuple[str, str]]:
    """(key, 'key: old -> new') for every key of either flat dict whose values differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, UNSET), b.get(key, UNSET)
        if va != vb:
            old, new = (v if v == UNSET else repr(v) for v in (va, vb))
            out.append((key, f"{key}: {old} -> {new}"))
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) 'key: old -> new' lines between a checkpoint's config and a new one.

    Every key of either side is compared, a key only one side has counting as a change
    ('<unset>'); keys a newer version added to the defaults are filled in the old config
    first, so an upgrade alone changes nothing.
    """
    refused: list[str] = []
    allowed: list[str] = []
    for key, line in _differences(_with_defaults(old), _flatten(new)):
        safe = key in SAFE_KEYS or key.startswith(SAFE_PREFIXES)
        (allowed if safe else refused).append(line)
    return refused, allowed


def spec_changes(old: dict, new: dict) -> list[str]:
    """'model spec key: old -> new' lines between two model specs, defaults resolved (refused)."""
    a, b = _flatten(resolved_spec(old)), _flatten(resolved_spec(new))
    if "class_names" not in old:  # saved by versions that did not record class names
        b = {k: v for k, v in b.items() if k != "class_names"}
    return [f"model spec {line}" for _, line in _differences(a, b)]


def _key_name(entry: Any) -> str:
    """One path entry of a pytree (attribute, dict key or sequence index) as text."""
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/c' -> (shape, dtype) of every array leaf of a pytree (or orbax metadata tree)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )[0]
    return {
        "/".join(_key_name(e) for e in path): (tuple(x.shape), str(jax.numpy.dtype(x.dtype)))
        for path, x in leaves
        if hasattr(x, "shape")
    }


def structure_mismatches(saved: Any, target: Any) -> list[str]:
    """'key: saved -> expected' lines where a saved state's arrays differ from the target's."""
    a, b = _leaf_table(saved), _leaf_table(target)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            old, new = (f"{v[1]}{list(v[0])}" if v else "absent" for v in (a.get(key), b.get(key)))
            lines.append(f"{key}: {old} -> {new}")
    return lines


def _saved_structure(state_dir: Path) -> Any:
    """The orbax metadata tree (shapes, dtypes) of a saved state item."""
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


class Checkpointer:
    """A CheckpointManager for one run directory (see module docstring)."""

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, keep_period: int = 0, use_async: bool = True
    ):
        quiet_orbax()
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._saving: int | None = None  # the step whose save is in flight
        async_options = ocp.AsyncOptions(post_finalization_callback=self._manifest_in_tmp)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=use_async,
            async_options=async_options if use_async else None,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", SPEC_ITEM)
        )
        self._pending: list[int] = []  # started saves whose manifest is not written yet
        self.last_saved: int | None = None

    def _manifest_in_tmp(self) -> None:
        """orbax's hook after the files are final, before the rename that commits them."""
        if jax.process_index() != 0 or self._saving is None:
            return
        tmp = sorted(self.directory.glob(f"{self._saving}.orbax-checkpoint-tmp*"))
        if len(tmp) == 1:
            write_manifest(tmp[0])

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def _save_error(self, step: int | str, e: BaseException) -> CheckpointSaveError:
        """One line naming the folder, the error and the free space."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory} failed "
            f"({type(e).__name__}: {first:.200}); {free_space(self.directory)}"
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
        self._saving = int(step)
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
        for step in pending:  # synchronous saves (and a failed hook): manifest after the commit
            step_dir = self.directory / str(step)
            if step_dir.is_dir() and not (step_dir / MANIFEST).exists():
                try:
                    write_manifest(step_dir)
                except OSError as e:
                    raise self._save_error(step, e) from e

    def _move_aside(self, step: int, reason: str, kind: str = "unreadable") -> None:
        """Rename a step folder that cannot be trusted (never delete it) and warn once."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        warnings.warn(
            f"checkpoint {src} is {kind} ({reason:.300}); moved to {dst.name}", stacklevel=3
        )
        self.manager.reload()

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"]

    def _check_changes(self, step: int, config: dict | None, spec: dict | None) -> list[str]:
        """Allowed config changes vs the step's; ConfigChangedError on a refused one.

        Raises OSError/ValueError if the step's config item cannot be read.
        """
        step_dir = self.directory / str(step)
        old = read_json_item(step_dir, "config")
        if config is None:
            return []
        refused, allowed = config_changes(old, config)
        if spec is not None and (step_dir / SPEC_ITEM).is_dir():
            refused += spec_changes(read_json_item(step_dir, SPEC_ITEM), spec)
        if refused:
            raise ConfigChangedError(
                f"the config differs from the one of checkpoint {step_dir} in "
                f"keys that shape the training state: {'; '.join(refused)}. Restore these "
                "values to resume, or train in a new --workdir"
            )
        return allowed

    def _check_structure(self, step: int, saved: Any, target: Any) -> None:
        """CheckpointMismatchError naming the keys where the saved state differs from target."""
        lines = structure_mismatches(saved, target)
        if lines:
            more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} holds a state of another structure "
                f"than this config builds: {'; '.join(lines[:5])}{more}. Nothing was changed; "
                "restore the config it was trained with, or train in a new --workdir"
            )

    def _problem(self, step: int, verified: bool) -> tuple[str, str] | None:
        """(kind, reason) if the step cannot be trusted, checked by its manifest."""
        step_dir = self.directory / str(step)
        if not (step_dir / MANIFEST).exists():
            if verified:  # an older step has a manifest: this one was not committed whole
                return "unverified", f"it has no {MANIFEST} while older checkpoints have one"
            return None  # written before manifests existed
        problem = verify_manifest(step_dir)
        return None if problem is None else ("unreadable", problem)

    def _try_step(self, step: int, target: Any, config, spec, verified: bool):
        """(state, data, allowed changes) of one step, or (kind, reason) if it is corrupt."""
        problem = self._problem(step, verified)
        if problem is not None:
            return problem
        try:
            allowed = self._check_changes(step, config, spec)
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigChangedError):
                raise
            return "unreadable", f"its config item is unreadable ({e})"
        try:
            saved = _saved_structure(self.directory / str(step) / "state")
        except Exception as e:  # noqa: BLE001 - unreadable metadata: corrupt
            return "unreadable", repr(e)
        self._check_structure(step, saved, target)
        try:
            state, data_state = self._restore_step(step, target)
        except Exception as e:  # noqa: BLE001 - a read failure once the structure matched
            return "unreadable", repr(e)
        return state, data_state, allowed

    def restore_latest(
        self, target: Any, config: dict | None = None, *, spec: dict | None = None
    ) -> tuple[int, Any, dict, list[str]] | None:
        """(step, state, data_state, allowed config changes) of the newest readable step.

        None if the run has no checkpoint. Corrupt steps are moved aside; `config` (a JSON
        dict) and `spec` (the resolved model spec) are compared with the step's and
        ConfigChangedError raised on a refused change; CheckpointMismatchError if the saved
        arrays do not fit `target`; NoReadableCheckpointError if every step is corrupt.
        """
        steps = committed_steps(self.directory)
        moved: list[str] = []
        for i, step in enumerate(reversed(steps)):
            older = steps[: len(steps) - 1 - i]
            verified = any((self.directory / str(s) / MANIFEST).exists() for s in older)
            out = self._try_step(step, target, config, spec, verified)
            if len(out) == 3:
                return step, out[0], out[1], out[2]
            self._move_aside(step, out[1], out[0])
            moved.append(str(step))
        if moved:
            raise NoReadableCheckpointError(
                f"every checkpoint in {self.directory} is unreadable (steps {', '.join(moved)}, "
                "moved aside as <step>.unreadable-*/.unverified-*); to start this run again "
                "from step 0 on purpose, move the checkpoints folder away or use a new --workdir"
            )
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
