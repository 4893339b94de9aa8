"""EDM2 throughput: training images/s and sampling images/s with peak memory, as JSON.

Default: EDM2-S at 64x64 pixels (edm2-img64-s, 280M parameters, 1000 classes). One train
step = the training loop's own Trainer on NVlabs/edm2's recipe (forced weight normalisation,
EDM2 loss, Adam 0.9/0.99, inverse-sqrt lr, EMAs, sharding); sampling = EDM2's edm_sampler
(``--steps`` steps, 2 steps - 1 network calls). On a CPU use a tiny batch (and ``--channels`` to shrink the net); the JSON says which device ran.

    python benchmarks/bench_edm2.py --batch 64 --sample-batch 64          # on a GPU
    python benchmarks/bench_edm2.py --batch 1 --sample-batch 1 --steps 4  # CPU, slow
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
import types

import jax
import jax.numpy as jnp

from edm_jax.nets.model import count_params
from edm_jax.nets.presets import EDM2_TRAINING
from edm_jax.nets.spec import build_model_from_config
from edm_jax.samplers.edm2 import edm2_time_steps, sample_edm2
from edm_jax.train import recipes
from edm_jax.train.step import Trainer, batch_sharding, make_mesh, state_sharding


def peak_memory_bytes() -> dict:
    """Peak device memory (accelerators) and peak host RSS, in bytes."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def edm2_config(preset: str, batch: int, dtype: str, channels: int | None):
    """The training config of NVlabs/edm2's recipe for `preset` (edm2-<dataset>-<size>)."""
    _, dataset, size = preset.split("-")
    c = recipes.edm2(f"size={size}", dataset=dataset)
    t = EDM2_TRAINING[preset]
    c.data.update(resolution=t["img_resolution"], channels=t["img_channels"], use_labels=True)
    c.model.dtype = dtype
    if channels:
        c.model.net.model_channels = channels
    c.train.batch_size = batch
    return c


def bench_train(config, model, iters: int) -> dict:
    """Training images/s of the real Trainer (forced weight normalisation, EDM2 loss, Adam
    0.9/0.99 with the inverse-sqrt lr, EMAs, sharding), after one compile-and-warm-up step."""
    trainer = Trainer.from_config(model, config)
    mesh = make_mesh()
    shardings = state_sharding(jax.eval_shape(trainer.init, jax.random.key(0)), mesh)
    state = jax.jit(trainer.init, out_shardings=shardings)(jax.random.key(0))
    batch = config.train.batch_size
    shape = (batch, model.img_resolution, model.img_resolution, model.img_channels)
    arrays = {
        "image": jax.random.normal(jax.random.key(1), shape) * 0.5,
        "label": jax.random.randint(jax.random.key(2), (batch,), 0, model.label_dim),
    }
    arrays = jax.device_put(arrays, batch_sharding(mesh))
    step = trainer.jit_step(mesh, shardings)
    t0 = time.perf_counter()
    state, m = step(state, arrays)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        state, m = step(state, arrays)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    n = count_params(jax.device_get(state.params))
    return {"train_images_per_s": batch * iters / dt, "train_step_s": dt / iters,
            "train_compile_s": compile_s, "num_params": n, "loss": float(m["loss"])}  # fmt: skip


def bench_sample(model, batch: int, steps: int) -> dict:
    """Sampling images/s with EDM2's sampler (float32 steps, Heun, last step Euler)."""
    params = jax.jit(model.init)(jax.random.key(0))
    t_steps = edm2_time_steps(steps)
    labels = jnp.zeros((batch, model.label_dim)).at[:, 0].set(1.0) if model.label_dim else None

    @jax.jit
    def run(params, noise):
        denoise = functools.partial(model.denoise, params, labels=labels)
        return sample_edm2(denoise, noise * t_steps[0], t_steps)

    shape = (batch, model.img_resolution, model.img_resolution, model.img_channels)
    noise = jax.random.normal(jax.random.key(5), shape)
    t0 = time.perf_counter()
    run(params, noise).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(params, noise + 0.1).block_until_ready()
    dt = time.perf_counter() - t0
    return {"sample_images_per_s": batch / dt, "sample_batch_s": dt,
            "sample_compile_and_first_s": compile_s, "network_calls": 2 * steps - 1}  # fmt: skip


def main(argv=None) -> dict:
    """Parse flags, run both benchmarks, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="edm2-img64-s", choices=sorted(EDM2_TRAINING))
    p.add_argument("--channels", type=int, default=None, help="override model_channels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sample-batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--steps", type=int, default=32, help="sampler steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    t = EDM2_TRAINING[args.preset]
    config = edm2_config(args.preset, args.batch, args.dtype, args.channels)
    source = types.SimpleNamespace(
        resolution=t["img_resolution"], channels=t["img_channels"], num_classes=1000
    )
    model = build_model_from_config(config, source)
    result = {
        "benchmark": "edm2", "preset": args.preset, "model_channels": model.net.model_channels,
        "resolution": t["img_resolution"], "dtype": args.dtype, "batch": args.batch,
        "sample_batch": args.sample_batch, "sampler_steps": args.steps,
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "num_devices": 1,
    }  # fmt: skip
    result |= bench_train(config, model, args.iters)
    result |= bench_sample(model, args.sample_batch, args.steps)
    result |= peak_memory_bytes()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
