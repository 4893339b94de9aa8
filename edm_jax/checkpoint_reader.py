"""Read training checkpoints without the training stack; their spec and checksum files.

A training workdir holds ``checkpoints/<step>/`` folders written by orbax (through
``edm_jax.train.checkpoint``): items ``state/``, ``data/``, ``config/`` and
``model_spec/`` (everything ``build_model`` needs), plus ``sha256.json``, the SHA-256 of
every data file of the step, written before the step commits. Orbax writes a step to a
temporary folder and renames it, so a folder named by its step number is complete.

Readers here never write to or clean a workdir: they list the committed steps, verify
the checksums when present, build the model from its spec and restore the EMA alone,
falling back to an older step when the newest cannot be read (e.g. while it is deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "SPEC_ITEM",
    "committed_steps",
    "load_checkpoint",
    "locate_checkpoint",
    "quiet_orbax",
    "read_json_item",
    "verify_manifest",
    "write_manifest",
]

MANIFEST = "sha256.json"
SPEC_ITEM = "model_spec"
_NOISE = ("Unable to find the step", "Metadata file does not exist")


class _QuietFilter(logging.Filter):
    """Drop orbax messages a user can do nothing about."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def quiet_orbax() -> None:
    """Silence orbax's 'Unable to find the step N for deletion' and missing-metadata noise."""
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietFilter) for f in logger.filters):
            logger.addFilter(_QuietFilter())
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietFilter) for f in handler.filters):
            handler.addFilter(_QuietFilter())


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the committed checkpoints in a checkpoints/ folder, ascending (read only)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        if p.name.isdigit() and p.is_dir() and (p / "_CHECKPOINT_METADATA").exists():
            steps.append(int(p.name))
    return sorted(steps)


# orbax's own bookkeeping, rewritten when the step commits (after the manifest is written)
_UNSUMMED = (MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")


def _files(step_dir: Path) -> list[Path]:
    """Every data file of a step folder (not the manifest or orbax's commit records), sorted."""
    return sorted(
        p
        for p in step_dir.rglob("*")
        if p.is_file() and p.relative_to(step_dir).as_posix() not in _UNSUMMED
    )


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: str | os.PathLike) -> None:
    """Write <step>/sha256.json (relative path -> SHA-256) atomically."""
    step_dir = Path(step_dir)
    table = {p.relative_to(step_dir).as_posix(): _sha256(p) for p in _files(step_dir)}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: str | os.PathLike) -> str | None:
    """None if the step's files match its manifest (or it has none), else what is wrong."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, digest in table.items():
        f = step_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if _sha256(f) != digest:
            return f"{rel} does not match its SHA-256 in {MANIFEST}"
    return None


def read_json_item(step_dir: str | os.PathLike, item: str) -> Any:
    """A JSON item (config, data, model_spec) of a step, read as a plain file."""
    return json.loads((Path(step_dir) / item / "metadata").read_text())


def locate_checkpoint(path: str) -> tuple[Path, int | None]:
    """(checkpoints folder, step) of a workdir (step None: the newest) or one step folder."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return Path(path) / "checkpoints", None
    parent, name = os.path.split(os.path.normpath(path))
    is_step = name.isdigit() and os.path.basename(parent) == "checkpoints"
    if is_step and os.path.isdir(os.path.join(path, "state")):
        return Path(parent), int(name)
    raise ValueError(
        f"no checkpoint found in {path}: expected a training workdir (holding checkpoints/), "
        "one checkpoint folder (checkpoints/<step>) or a reference .npz"
    )


def _restore_ema(state_dir: Path) -> Any:
    """The 'ema' subtree of a saved TrainState, on the first local device."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "ema": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["ema"]
        )
    }
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return checkpointer.restore(state_dir, args=args)["ema"]


def _model_from_old_config(config: Any, step_dir: Path) -> Any:
    """Checkpoints written before model_spec existed: the model from the training config."""
    import types

    from edm_jax.nets.spec import build_model_from_config

    label_dim = 0
    if config.data.use_labels:
        import orbax.checkpoint as ocp

        meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        label_dim = int(tree["ema"]["map_label"]["kernel"].shape[0])
    resolution = config.model.get("img_resolution", 0) or config.data.resolution
    source = types.SimpleNamespace(
        num_classes=label_dim, resolution=resolution, channels=config.data.channels
    )
    return build_model_from_config(config, source)


def _read_step(step_dir: Path) -> tuple[Any, Any, Any]:
    """(model, EMA params, config) of one step folder; raises if anything is unreadable."""
    import ml_collections

    problem = verify_manifest(step_dir)
    if problem is not None:
        raise ValueError(problem)
    config = ml_collections.ConfigDict(read_json_item(step_dir, "config"))
    if (step_dir / SPEC_ITEM).is_dir():
        from edm_jax.nets.spec import model_from_spec

        model = model_from_spec(read_json_item(step_dir, SPEC_ITEM))
    else:
        model = _model_from_old_config(config, step_dir)
    return model, _restore_ema(step_dir / "state"), config


def _next_step(directory: Path, tried: set[int]) -> int | None:
    """The newest committed step not tried yet, listed afresh (saves and rotation go on)."""
    fresh = [s for s in committed_steps(directory) if s not in tried]
    return fresh[-1] if fresh else None


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(model, EMA params, config) of the newest readable committed step (or the one given).

    The step list is read again after each failure, so a reader keeps up with a run that
    saves and rotates its checkpoints while it reads.
    """
    quiet_orbax()
    directory, step = locate_checkpoint(os.path.abspath(path))  # orbax needs absolute paths
    if step is None and not committed_steps(directory):
        raise ValueError(f"no committed checkpoint in {path} (the run has not saved one yet)")
    errors: list[str] = []
    tried: set[int] = set()
    s = step if step is not None else _next_step(directory, tried)
    while s is not None and len(tried) < 64:
        try:
            return _read_step(directory / str(s))
        except Exception as e:  # noqa: BLE001 - unreadable step: try the next newest
            errors.append(f"step {s}: {e!r:.200}")
            tried.add(s)
            failed, reason = s, f"{e!r:.200}"
        s = None if step is not None else _next_step(directory, tried)
        if s is not None:
            warnings.warn(
                f"checkpoint {directory / str(failed)} is unreadable ({reason}); "
                f"reading checkpoint {s}",
                stacklevel=2,
            )
    raise ValueError(f"no readable checkpoint in {path}: " + "; ".join(errors))
