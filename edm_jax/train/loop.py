"""The training loop: build everything from a config, resume, train, log, sample, checkpoint.

``train(config, workdir)`` takes the workdir's lock, validates the config against the
devices and the data before anything is compiled, resumes from the newest readable
checkpoint in ``workdir`` (refusing a config change that shapes the state), and returns a
summary dict. SIGTERM, SIGINT (Ctrl-C) or ``stop_at_step`` save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from edm_jax.cadence import crossed
from edm_jax.data.load import describe_source, load_source
from edm_jax.data.pipeline import make_pipeline, to_global
from edm_jax.fileio import atomic_write_text
from edm_jax.nets.spec import model_from_spec, spec_from_config
from edm_jax.train import grid
from edm_jax.train.checkpoint import Checkpointer, abstract_state
from edm_jax.train.config_io import to_json
from edm_jax.train.evaluate import make_evaluator
from edm_jax.train.multihost import host_copy
from edm_jax.train.reporting import Reporter, check_params, summarize_rows
from edm_jax.train.step import Trainer, batch_sharding, make_mesh, state_sharding
from edm_jax.train.validate import check_numbers_and_platform, validate_config, validate_data
from edm_jax.train.workdir_lock import WorkdirLock

__all__ = ["Run", "setup", "total_steps", "train"]

# The state initialisation runs once: compile it without LLVM's slow optimisations (same
# values; on the CPU the ~100 random-init kernels otherwise take minutes to compile).
FAST_COMPILE: dict[str, Any] = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Number of steps to reach train.total_kimg at train.batch_size."""
    return math.ceil(config.train.total_kimg * 1000 / config.train.batch_size)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built and checked by setup()."""

    config: ml_collections.ConfigDict
    workdir: Path
    model: Any
    mesh: Any
    state: Any
    pipeline: Any
    step_fn: Any
    checkpointer: Checkpointer
    resumed_from: int | None
    spec: dict
    lock: WorkdirLock | None = None
    lr_fn: Any = None  # step -> lr (the Trainer's schedule), for the logs
    grow_from: str | None = None  # a k-diffusion image_v1 run to grow a fresh run from
    gns: Any = None  # train.gns: k-diffusion's GradientNoiseScale estimator (host side)


def _say(line: str) -> None:
    """One line on stdout from the primary process (start, resume, compile, stop)."""
    if jax.process_index() == 0:
        print(line, flush=True)


def _lock(workdir: Path) -> WorkdirLock | None:
    """The workdir lock, held by the primary process of a run."""
    if jax.process_index() != 0:
        return None
    lock = WorkdirLock(workdir)
    lock.acquire()
    return lock


def _restore(ckpt: Checkpointer, config, spec: dict, shape, shardings):
    """Restore the newest readable step (None if none), saying which config changes it allows."""
    target = abstract_state(shape, shardings)
    restored = ckpt.restore_latest(target, json.loads(to_json(config)), spec=spec)
    if restored is not None and restored[3] and jax.process_index() == 0:
        print(f"resuming from step {restored[0]} with changed settings that are safe to "
              f"change: {'; '.join(restored[3])}", flush=True)  # fmt: skip
    return restored


def setup(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    devices=None,
    grow_from: str | None = None,
) -> Run:
    """Lock the workdir, validate, build model/mesh/step, restore or initialise the state
    (a fresh state grown from the run in ``grow_from``, k-diffusion's progressive growing)."""
    devices = jax.devices() if devices is None else list(devices)
    validate_config(config, len(devices))
    check_numbers_and_platform(config, devices)
    source = load_source(config.data)
    validate_data(config, source)
    _say(describe_source(source, config.data))
    spec = spec_from_config(config, source)
    model = model_from_spec(spec)
    if grow_from is not None:  # one clear line now if there is no image_v1 run to grow
        from edm_jax.train.kdiff_run import check_growth

        check_growth(grow_from, model)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock(workdir)
    try:
        return _build(config, workdir, devices, source, spec, model, lock, grow_from)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(config, workdir: Path, devices, source, spec, model, lock, grow_from) -> Run:
    """setup() once the workdir is locked."""
    mesh = make_mesh(devices)
    trainer = Trainer.from_config(model, config)  # one optimizer for the state and the step
    shape = jax.eval_shape(trainer.init, jax.random.key(0))
    shardings = state_sharding(shape, mesh, config.train.fsdp, config.train.fsdp_min_size)
    pipeline = make_pipeline(
        source, global_batch_size=config.train.batch_size, seed=config.seed,
        num_workers=config.data.num_workers,
    )  # fmt: skip
    ckpt = Checkpointer(
        workdir, keep=config.log.keep_checkpoints, keep_period=config.log.keep_period_steps
    )
    run = Run(config, workdir, model, mesh, None, pipeline, None, ckpt, None, spec, lock,
              trainer.lr_fn, grow_from)  # fmt: skip
    try:
        _start(run, trainer, shape, shardings)
    except BaseException:
        ckpt.close()  # its threads would otherwise print tracebacks at interpreter exit
        pipeline.close()
        raise
    return run


def _start(run: Run, trainer: Trainer, shape, shardings) -> None:
    """Restore the newest readable step into run (or initialise the state); jit the step."""
    config = run.config
    restored = _restore(run.checkpointer, config, run.spec, shape, shardings)
    if restored is None:
        key = jax.random.key(config.seed)
        init_fn = jax.jit(trainer.init, out_shardings=shardings).lower(key).compile(FAST_COMPILE)
        run.state = init_fn(key)
        if run.grow_from is not None:
            run.state = _grown(run, trainer, jax.random.fold_in(key, _GROW_KEY), shardings)
    else:
        run.resumed_from, run.state, data_state = restored[0], restored[1], restored[2]
        run.pipeline.set_state(data_state)
        run.checkpointer.last_saved = restored[0]
        _say(f"resumed from step {restored[0]} of {total_steps(config)}")
        if run.grow_from is not None:
            _say(
                f"--grow-from {run.grow_from} is not used: this run resumes from its own checkpoint"
            )
    if jax.process_index() == 0:
        atomic_write_text(run.workdir / "config.json", to_json(config))
    run.step_fn = trainer.jit_step(run.mesh, shardings)


_GROW_KEY = 0x6720  # fold_in tag of the grown network's new proj_in


def _grown(run: Run, trainer: Trainer, key, shardings):
    """A fresh state whose params and EMAs are the grown EMA of the run in run.grow_from."""
    from edm_jax.train.kdiff_run import grown_params

    params = grown_params(str(run.grow_from), run.model, key)
    copy = lambda: jax.tree.map(lambda x: jax.numpy.array(x, copy=True), params)  # noqa: E731
    state = run.state.replace(  # the step donates the state: no two fields share a buffer
        params=copy(), ema=copy(), power_ema=tuple(copy() for _ in run.state.power_ema),
        opt_state=trainer.tx.init(params),
    )  # fmt: skip
    _say(f"grown from the EMA of {run.grow_from}")
    return jax.device_put(state, shardings)


class _StopFlag:
    """Set by SIGTERM or SIGINT (when installed from the main thread); restored on exit.

    A second SIGINT raises KeyboardInterrupt at once (the checkpoint is not waited for).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.set, self.name, self._previous = False, "", {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.name = True, signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


def _save(run: Run, step: int) -> None:
    """Checkpoint state, data position, config and model spec at step (async).

    The parameters and their EMA are checked first (finite, below a sane size): a diverged
    state is never saved over the last good one.
    """
    check_params({"params": run.state.params, "ema": run.state.ema}, step)
    run.checkpointer.save(step, run.state, run.pipeline.get_state(), to_json(run.config), run.spec)


def _maybe_grid(run: Run, sampler, step: int, prev_step: int | None) -> str | None:
    """Sample a grid with the EMA params at a sample_every_kimg boundary (prev_step None: now)."""
    every, bs = run.config.log.sample_every_kimg, run.config.train.batch_size
    if sampler is None:
        return None
    if prev_step is not None and not crossed(step, prev_step, bs, every):
        return None
    ema = host_copy(run.state.ema, run.mesh)  # edm_jax.sample runs on this host's devices
    images = sampler(jax.random.key(run.config.log.sample_seed), ema)  # [n, H, W, C] numpy
    _, cols = grid.grid_shape(run.model.label_dim, run.config.log.sample_grid)
    path = run.workdir / "samples" / f"grid_{step:08d}.png"
    if jax.process_index() == 0:  # every process samples the same seeds, one writes
        grid.save_grid(path, np.asarray(images), cols)
        grid.save_grid(run.workdir / "samples" / "latest.png", np.asarray(images), cols)
    return str(path)


def _make_sampler(run: Run):
    """The grid sampler (edm_jax.sample in bounded batches), or None when grids are off."""
    if run.config.log.sample_every_kimg <= 0:
        return None
    rows, cols = grid.grid_shape(run.model.label_dim, run.config.log.sample_grid)
    return grid.make_grid_sampler(run.model, n=rows * cols, steps=run.config.log.sample_steps)


def _phema_snapshots(run: Run, step: int) -> None:
    """EDM2 post-hoc EMA: write the power EMAs at each ema.snapshot_every_kimg boundary."""
    from edm_jax.train import phema  # here: keeps `python -m edm_jax.train.phema` clean

    phema.maybe_save_snapshots(run.workdir, run.model, run.state, run.config, step)


def _log(run: Run, reporter: Reporter, pending: list, step: int) -> None:
    """Average the pending per-step metrics, log them (raises on a non-finite loss)."""
    if not pending:
        return
    rows = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
    if run.config.train.gns:
        _update_gns(run, rows)
    lr = float(run.lr_fn(jax.numpy.asarray(step - 1)))
    reporter.log(step, summarize_rows(rows), lr)
    pending.clear()


def _update_gns(run: Run, rows: list[dict]) -> None:
    """Fold each step's squared gradient norms into the gradient noise scale (k-diffusion's
    --gns: small batches = the micro-batches, large = the whole batch); rows gain its value.
    The estimator's averages are host state: they start afresh when a run resumes."""
    from edm_jax.train.kdiff_recipe import GradientNoiseScale

    if run.gns is None:
        run.gns = GradientNoiseScale()
    b = run.config.train.batch_size
    for row in rows:
        small, large = row["gns_sq_norm_small"], row["gns_sq_norm_large"]
        run.gns.update(small, large, b // run.config.train.grad_accum, b)
        row["gradient_noise_scale"] = run.gns.gradient_noise_scale


def _loop(run: Run, reporter: Reporter, stop: _StopFlag, stop_at_step: int | None) -> dict:
    """Run steps until the end, SIGTERM or stop_at_step; returns the status info."""
    cfg, total = run.config, total_steps(run.config)
    step = int(jax.device_get(run.state.step))
    info: dict[str, Any] = {"status": "finished"}
    pending: list[Any] = []
    sampler, shard = _make_sampler(run), batch_sharding(run.mesh)
    info["grid"] = _maybe_grid(run, sampler, step, None) if step == 0 else None
    grid_step = step if info["grid"] else None
    evaluate = make_evaluator(  # eval.every_kimg: FID etc. (no-op when off)
        cfg, run.model, run.workdir, lambda: host_copy(run.state.ema, run.mesh)
    )
    if step < total:
        _say(f"compiling the train step (the first step takes a while), then {total - step} steps")
    while step < total:
        run.checkpointer.check()  # a failed background save stops the run now
        preempted = stop.set or run.checkpointer.reached_preemption(step)
        if preempted or (stop_at_step is not None and step >= stop_at_step):
            info["status"] = f"stopped ({stop.name or 'SIGTERM'})" if preempted else "stopped"
            break
        batch = to_global(next(run.pipeline), shard)
        run.state, metrics = run.step_fn(run.state, batch)
        step, pending = step + 1, pending + [metrics]
        if step % cfg.log.log_every_steps == 0 or step == total:
            _log(run, reporter, pending, step)
        if step % cfg.log.checkpoint_every_steps == 0:
            _save(run, step)
        _phema_snapshots(run, step)
        if path := _maybe_grid(run, sampler, step, step - 1):
            info["grid"], grid_step = path, step
        evaluate(reporter, step, step - 1)
    _log(run, reporter, pending, step)
    if run.checkpointer.last_saved != step and step > 0:
        _save(run, step)
    if info["status"] == "finished" and grid_step != step:
        info["grid"] = _maybe_grid(run, sampler, step, None) or info["grid"]
    return info | {"step": step}


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    devices=None,
    stop_at_step: int | None = None,
    print_summary: bool = True,
    grow_from: str | None = None,
) -> dict:
    """Train (or resume) per config in workdir; returns a summary.

    Keys: status, step, last (metrics), resumed_from, checkpoint, grid, params, state
    (the final TrainState), data_state (the pipeline position) and num_devices.
    """
    run = setup(config, workdir, devices, grow_from)
    reporter = Reporter(
        run.workdir, total_steps=total_steps(config), start_step=int(jax.device_get(run.state.step)),
        batch_size=config.train.batch_size, use_tqdm=config.log.tqdm,
        use_tensorboard=config.log.tensorboard,
    )  # fmt: skip
    try:
        with _StopFlag() as stop:
            info = _loop(run, reporter, stop, stop_at_step)
            run.checkpointer.wait()
        if info["status"].startswith("stopped"):
            _say(f"stopped at step {info['step']}; rerun the same command to resume")
        info["checkpoint"] = str(run.checkpointer.directory)
        info["params"] = run.model.num_params(jax.device_get(run.state.params))
        text = reporter.summary(info)
        if print_summary and jax.process_index() == 0:
            print(text, flush=True)
        return info | {
            "last": reporter.last, "resumed_from": run.resumed_from, "state": run.state,
            "data_state": run.pipeline.get_state(), "num_devices": run.mesh.devices.size,
        }  # fmt: skip
    finally:
        reporter.close()
        try:
            run.checkpointer.close()
        finally:
            run.pipeline.close()
            if run.lock is not None:
                run.lock.release()
