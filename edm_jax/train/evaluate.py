"""Sample-quality evaluation during training (config keys eval.*, off by default).

``check_eval_config`` checks the eval section before anything compiles; ``make_evaluator``
scores the EMA parameters at ``eval.every_kimg`` boundaries with the metrics library
(``edm_jax.metrics.evaluate``: detectors, Scorer, generate_and_score), handed the model and
a getter of the EMA on this host, as big_vision's evaluators take predict functions. Rows go
to ``stats.jsonl`` (``eval/<metric>``, ``eval/time_s``) and TensorBoard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from edm_jax import api
from edm_jax.cadence import crossed
from edm_jax.checks import check_seeds
from edm_jax.metrics import refs
from edm_jax.metrics.evaluate import (
    Scorer,
    check_metrics,
    check_reference,
    check_weights,
    generate_and_score,
    load_detectors,
)
from edm_jax.train.reporting import append_line

__all__ = ["check_eval_config", "make_evaluator"]


def check_eval_config(config) -> None:
    """Check the eval.* keys (metrics, count, sampler, seed, weight and reference files) up front."""
    if "eval" not in config:
        return
    ev = config.eval
    every = ev.every_kimg
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0:
        raise ValueError(f"config.eval.every_kimg must be a number >= 0 (0: off), got {every!r}")
    try:  # checked even while evaluation is off: a typo shows now, not when it is turned on
        api.check_sample_args(ev.sampler, ev.steps, ev.batch_size)
        check_seeds([ev.seed])  # config.eval.seed
    except ValueError as e:
        raise ValueError(f"config.eval: {e}") from None
    if every == 0:
        return
    metrics = check_metrics(ev.metrics)
    if isinstance(ev.num, bool) or not isinstance(ev.num, int) or ev.num < 2:
        raise ValueError(
            f"config.eval.num must be an int >= 2 (images per evaluation), got {ev.num!r}"
        )
    check_weights(metrics, ev.weights)
    if set(metrics) - {"is"}:
        if not ev.ref:
            raise ValueError("config.eval.ref must name a reference .npz/.pkl for " + str(metrics))
        ref = refs.load_ref(ev.ref)
        for metric in set(metrics) - {"is"}:
            if metric not in ref:
                raise ValueError(
                    f"config.eval.ref={ev.ref} has no {metric!r} statistics; it has {sorted(ref)}"
                )


def make_evaluator(config, model: Any, workdir: str | Path, ema_params: Callable[[], Any]):
    """evaluate(reporter, step, prev_step): score ``ema_params()`` at eval.every_kimg boundaries.

    Detectors and the reference are loaded here (before the first train step compiles); the
    images are drawn from seeds 0..eval.num-1 under the key eval.seed. A no-op when
    eval.every_kimg is 0.
    """
    ev, bs = config.eval, config.train.batch_size
    if ev.every_kimg <= 0:
        return lambda reporter, step, prev_step: None
    metrics = check_metrics(ev.metrics)
    detectors = load_detectors(metrics, ev.weights)
    ref = refs.load_ref(ev.ref) if set(metrics) - {"is"} else {}
    dims = {n: int(d.feature_dim) for n, d in detectors.items()}
    check_reference(ref, metrics, dims, ev.ref)

    def evaluate(reporter, step: int, prev_step: int | None):
        if step == 0 or (prev_step is not None and not crossed(step, prev_step, bs, ev.every_kimg)):
            return None
        t0 = time.time()
        scorer = Scorer(metrics, detectors, ev.num, ev.batch_size)
        generate_and_score(jax.random.key(ev.seed), ema_params(), model, scorer,
                           seeds=range(ev.num), sampler=ev.sampler, num_steps=ev.steps)  # fmt: skip
        row = {"step": step, "kimg": step * bs / 1000}
        row |= {f"eval/{k}": v for k, v in scorer.results(ref).items()}
        row["eval/time_s"] = time.time() - t0
        if jax.process_index() == 0:
            append_line(Path(workdir) / "stats.jsonl", json.dumps(row))
            tb = getattr(reporter, "tb", None)
            for k, v in row.items():
                if tb is not None and k.startswith("eval/"):
                    tb.add_scalar(k, v, step)
        return row

    return evaluate
