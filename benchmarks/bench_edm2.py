"""EDM2 throughput: training images/s and sampling images/s with peak memory, as JSON.

Default: EDM2-S at 64x64 pixels (edm2-img64-s, 280M parameters, 1000 classes). One train
step = forced weight normalisation + EDM2 loss gradient + Adam (0.9/0.99) + inverse-sqrt
lr; sampling = EDM2's edm_sampler (``--steps`` steps, 2 steps - 1 network calls). On a CPU
use a tiny batch (and ``--channels`` to shrink the net); the JSON says which device ran.

    python benchmarks/bench_edm2.py --batch 64 --sample-batch 64          # on a GPU
    python benchmarks/bench_edm2.py --batch 1 --sample-batch 1 --steps 4  # CPU, slow
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import optax

from edm_jax.losses import edm2_loss
from edm_jax.nets.edm2_unet import edm2_logvar, forced_normalize
from edm_jax.nets.model import count_params
from edm_jax.nets.presets import EDM2_TRAINING, build_model
from edm_jax.samplers.edm2 import edm2_time_steps, sample_edm2
from edm_jax.train.edm2 import make_edm2_optimizer


def peak_memory_bytes() -> dict:
    """Peak device memory (accelerators) and peak host RSS, in bytes."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def make_train_step(model, tx, t):
    """Jitted (params, opt_state, images, labels, rng) -> (params, opt_state, loss)."""
    logvar = functools.partial(edm2_logvar, model)

    def loss_fn(params, batch, rng):
        def denoise(p, x, s, **c):
            return model.denoise(p, x, s, train=True, rng=rng, **c)

        kw = dict(P_mean=t["P_mean"], P_std=t["P_std"])
        return edm2_loss(rng, params, batch, denoise=denoise, logvar=logvar, **kw)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels, rng):
        params = forced_normalize(params)
        loss, grads = jax.value_and_grad(loss_fn)(params, {"image": images, "label": labels}, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def bench_train(model, t, batch: int, iters: int) -> dict:
    """Training images/s (after one compile-and-warm-up step)."""
    params = jax.jit(model.init)(jax.random.key(0))
    tx = make_edm2_optimizer(params, batch, t["ref_lr"], t["ref_batches"], 10)
    opt_state = tx.init(params)
    step = make_train_step(model, tx, t)
    shape = (batch, model.img_resolution, model.img_resolution, model.img_channels)
    images = jax.random.normal(jax.random.key(1), shape) * 0.5
    cls = jax.random.randint(jax.random.key(2), (batch,), 0, max(model.label_dim, 1))
    labels = cls if model.label_dim else None
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, images, labels, jax.random.key(3))
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(iters):
        params, opt_state, loss = step(params, opt_state, images, labels, jax.random.key(4 + i))
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    n = count_params(params)
    return {"train_images_per_s": batch * iters / dt, "train_step_s": dt / iters,
            "train_compile_s": compile_s, "num_params": n, "loss": float(loss)}  # fmt: skip


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
    over = {"model_channels": args.channels} if args.channels else {}
    model = build_model(
        args.preset, img_resolution=t["img_resolution"], img_channels=t["img_channels"],
        label_dim=1000, dtype=args.dtype, **over,
    )  # fmt: skip
    result = {
        "benchmark": "edm2", "preset": args.preset, "model_channels": model.net.model_channels,
        "resolution": t["img_resolution"], "dtype": args.dtype, "batch": args.batch,
        "sample_batch": args.sample_batch, "sampler_steps": args.steps,
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "num_devices": 1,
    }  # fmt: skip
    result |= bench_train(model, t, args.batch, args.iters)
    result |= bench_sample(model, args.sample_batch, args.steps)
    result |= peak_memory_bytes()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
