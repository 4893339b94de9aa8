"""HDiT throughput at k-diffusion's CIFAR-10 config: training and sampling images/s, as JSON.

The network is k-diffusion's ``configs/config_cifar10_transformer.json`` (image_transformer_v2,
32x32, patch 2, widths 256/512, depths 2/4, global attention, 10 classes; written out below),
built through ``train.py``'s own path (``kdiff_run.to_train_config``). One train step = the
training loop's Trainer on k-diffusion's recipe (Karras augmentation, stratified
cosine-interpolated sigmas, soft-min-snr loss, grouped AdamW + clip_grad_norm_, EMA warmup,
sharding). Sampling = ``edm_jax.sample`` with ``--sampler`` over ``--steps`` (karras grid,
class labels). ``--attention`` swaps the levels' attention for neighborhood (kernel 7) or
shifted-window (window 4) to time those kernels at the same widths. On a CPU use a tiny
batch; the JSON says which device ran.

    python benchmarks/bench_hdit.py --batch 128 --sample-batch 256             # on a GPU
    python benchmarks/bench_hdit.py --batch 4 --sample-batch 4 --steps 4       # CPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from edm_jax import api
from edm_jax.nets.spec import model_from_spec
from edm_jax.train import config_io, kdiff_run
from edm_jax.train.step import Trainer, batch_sharding, make_mesh, state_sharding

CIFAR10_TRANSFORMER = {
    "model": {
        "type": "image_transformer_v2", "input_channels": 3, "input_size": [32, 32],
        "patch_size": [2, 2], "depths": [2, 4], "widths": [256, 512],
        "self_attns": [{"type": "global"}, {"type": "global"}], "loss_config": "karras",
        "loss_weighting": "soft-min-snr", "dropout_rate": 0.05, "augment_prob": 0.12,
        "sigma_data": 0.5, "sigma_min": 1e-2, "sigma_max": 80,
        "sigma_sample_density": {"type": "cosine-interpolated"},
    },
    "dataset": {"type": "cifar10", "location": "data", "num_classes": 10, "cond_dropout_rate": 0.1},
    "optimizer": {"type": "adamw", "lr": 5e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                  "weight_decay": 1e-4},
    "lr_sched": {"type": "constant", "warmup": 0.0},
    "ema_sched": {"type": "inverse", "power": 0.6667, "max_value": 0.9999},
}  # fmt: skip
ATTENTION = {
    "global": {"type": "global"},
    "neighborhood": {"type": "neighborhood", "kernel_size": 7},
    "shifted-window": {"type": "shifted-window", "window_size": 4},
}


def _timed(fn, iters: int):
    """(seconds of the first call, seconds per later call, last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        out = jax.block_until_ready(fn())
    return first, (time.perf_counter() - t0) / iters, out


def bench_train(config, model, iters: int) -> dict:
    """Training images/s of the real Trainer after one compile-and-warm-up step."""
    trainer = Trainer.from_config(model, config)
    mesh = make_mesh()
    shardings = state_sharding(jax.eval_shape(trainer.init, jax.random.key(0)), mesh)
    state = jax.jit(trainer.init, out_shardings=shardings)(jax.random.key(0))
    b = config.train.batch_size
    batch = {
        "image": jax.random.uniform(jax.random.key(1), (b, 32, 32, 3), minval=-1, maxval=1),
        "label": jax.random.randint(jax.random.key(2), (b,), 0, 10),
    }
    batch = jax.device_put(batch, batch_sharding(mesh))
    step = trainer.jit_step(mesh, shardings)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        return m

    first, dt, m = _timed(run, iters)
    return {"train_images_per_s": b / dt, "train_step_s": dt, "train_first_step_s": first,
            "num_params": model.num_params(jax.device_get(holder["state"].params)),
            "loss": float(m["loss"])}  # fmt: skip


def bench_sample(model, params, n: int, sampler: str, steps: int, iters: int) -> dict:
    """Sampling images/s through edm_jax.sample (per-seed noise, one compiled program)."""

    def run():
        return api.sample(jax.random.key(0), params, model, seeds=np.arange(n),
                          labels=np.arange(n) % 10, sampler=sampler, num_steps=steps)  # fmt: skip

    first, dt, _ = _timed(run, iters)
    return {"sample_images_per_s": n / dt, "sample_batch_s": dt, "sample_first_batch_s": first}


def main(argv=None) -> dict:
    """Parse arguments, build the config, time training and sampling, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--attention", choices=sorted(ATTENTION), default="global")
    args = p.parse_args(argv)
    values = json.loads(json.dumps(CIFAR10_TRANSFORMER))
    values["model"]["self_attns"] = [dict(ATTENTION[args.attention]), {"type": "global"}]
    config = kdiff_run.to_train_config(values, config_io.default_config())
    config.train.batch_size = args.batch
    model = model_from_spec({"version": 1, "arch": "kdiffusion",
                             "config": json.loads(config.model.kdiff_config)})  # fmt: skip
    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "config": "k-diffusion config_cifar10_transformer.json", "attention": args.attention,
           "batch": args.batch, "sample_batch": args.sample_batch, "sampler": args.sampler,
           "steps": args.steps}  # fmt: skip
    out |= bench_train(config, model, args.iters)
    params = model.init(jax.random.key(0))
    out |= bench_sample(model, params, args.sample_batch, args.sampler, args.steps, args.iters)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
