"""What a run shows: progress bar, stats.jsonl, TensorBoard scalars, the final summary."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.fileio import free_space

__all__ = [
    "NonFiniteLossError", "Reporter", "append_line", "check_params", "repair_stats",
    "summarize_rows",
]  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss became NaN or infinite."""


# No trained network weight comes near this; past it a run has diverged (lr far too high)
# even if its loss is still finite, and a checkpoint of it would only hide the last good one.
PARAM_BOUND = 1e6


def check_params(tree: Any, step: int, what: str = "parameters") -> None:
    """Raise NonFiniteLossError unless every leaf is finite and below PARAM_BOUND in size."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        return
    sizes = jax.device_get([jnp.max(jnp.abs(x.astype(jnp.float32))) for _, x in leaves])
    worst = int(np.argmax([s if np.isfinite(s) else np.inf for s in sizes]))
    size = float(sizes[worst])
    if not math.isfinite(size) or size > PARAM_BOUND:
        name = jax.tree_util.keystr(leaves[worst][0])
        raise NonFiniteLossError(
            f"the {what} diverged at step {step} (max |{name}| = {size:.3g}, bound "
            f"{PARAM_BOUND:.0e}); stopping without saving them. The last good checkpoint is "
            "kept; lower optim.lr or set optim.grad_clip."
        )


def summarize_rows(rows: list[dict]) -> dict:
    """Mean of each metric over per-step metric dicts (host numpy)."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def append_line(path: Path, line: str) -> None:
    """Append one whole line with a single O_APPEND write (a crash leaves no half line).

    A failed write raises OSError naming the file and the free space.
    """
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError("short write (disk full?)")
        finally:
            os.close(fd)
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(f"appending to {path} failed ({reason}); {free_space(path)}") from e


def _json_row(row: dict) -> str:
    """A row as strict JSON: non-finite numbers (an infinite grad_norm) become null."""
    clean = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def repair_stats(path: Path, start_step: int) -> None:
    """Drop a partial last line and rows past start_step (logged after the checkpoint resumed)."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.split("\n")
    kept = []
    for line in lines[:-1]:  # the text after the last newline is a partial line, if any
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= start_step:
            kept.append(line)
    new = "".join(line + "\n" for line in kept)
    if new != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, path)


class Reporter:
    """tqdm bar (kimg, loss, img/s, ETA), stats.jsonl and TensorBoard, on the primary host only."""

    def __init__(self, workdir: Path, *, total_steps: int, start_step: int, batch_size: int,
                 use_tqdm: bool = True, use_tensorboard: bool = True):  # fmt: skip
        self.workdir, self.batch_size = Path(workdir), batch_size
        self.total_steps, self.start_step = total_steps, start_step
        self.primary = jax.process_index() == 0
        self.t_start = self.t_last = time.time()
        self.step_last = start_step
        self.last: dict[str, float] = {}
        if self.primary:
            repair_stats(self.workdir / "stats.jsonl", start_step)
        self.bar = self._bar(use_tqdm)
        self.tb = self._tensorboard(use_tensorboard)

    def _bar(self, use_tqdm: bool):
        if not (use_tqdm and self.primary):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True
        )

    def _tensorboard(self, use: bool):
        if not (use and self.primary):
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.workdir / "tensorboard"))

    def log(self, step: int, metrics: dict, lr: float) -> dict:
        """Record the metrics averaged since the last call; raise NonFiniteLossError on NaN/inf."""
        now = time.time()
        dt, dn = now - self.t_last, (step - self.step_last) * self.batch_size
        row = {"step": step, "kimg": step * self.batch_size / 1000, **metrics, "lr": lr}
        row |= {"img_per_s": dn / max(dt, 1e-9), "time_s": now - self.t_start}
        self.t_last, self.step_last, self.last = now, step, row
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} at step {step} ({row['kimg']:.1f} kimg); stopping."
                " The last good checkpoint is kept; lower optim.lr, set optim.grad_clip or use "
                "model.dtype='float32'."
            )
        if self.primary:
            self._write(row)
        return row

    def _write(self, row: dict) -> None:
        append_line(self.workdir / "stats.jsonl", _json_row(row))
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(kimg=f"{row['kimg']:.1f}", loss=f"{row['loss']:.4f}",
                                 img_s=f"{row['img_per_s']:.0f}")  # fmt: skip
            self.bar.update(row["step"] - self.bar.n)

    def summary(self, info: dict) -> str:
        """The one-screen summary printed at the end of a run."""
        self.close()
        last = self.last
        lines = ["", "=" * 64, f"  training {info.get('status', 'finished')}: {self.workdir}"]
        lines += [f"  steps        {info.get('step')} / {self.total_steps}"]
        if last:
            lines += [f"  kimg         {last['kimg']:.1f}", f"  loss (last)  {last['loss']:.4f}"]
            lines += [f"  images/s     {last['img_per_s']:.1f}"]
        lines += [f"  wall time    {time.time() - self.t_start:.0f} s"]
        for k in ("checkpoint", "grid", "params"):
            if info.get(k) is not None:
                lines += [f"  {k:<12} {info[k]}"]
        return "\n".join(lines + ["=" * 64])

    def close(self) -> None:
        """Close the bar and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
