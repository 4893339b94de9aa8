"""Where the train step's time goes: each part jitted alone, ms per call as JSON (CPU study).

DDPM++ at NVlabs' CPU comparison config (64 channels, mult [1,2,2], 32x32, batch 32, float32,
conditional): forward, loss, forward+backward, augmentation, nan_to_num + grad norm, Adam,
EMA (+ two EDM2 power EMAs), the whole step, and a bare 3x3 conv forward+backward at the
net's widest shape (to tell XLA:CPU's convolution speed from our code).

    python benchmarks/bench_train_breakdown.py [--batch 32] [--channels 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp

from edm_jax.data.augment import augment
from edm_jax.nets.spec import build_model_from_config
from edm_jax.train.config_io import default_config
from edm_jax.train.state import ema_update, init_state, make_optimizer
from edm_jax.train.step import (
    StepConfig,
    _update_emas,
    batch_sharding,
    make_loss_fn,
    make_mesh,
    make_train_step,
    state_sharding,
)


def _ms(fn, *args, repeats: int) -> float:
    """Median ms of fn(*args) after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 2)


def study_config(batch: int, channels: int, blocks: int = 4, power_stds=(0.05, 0.1)):
    """NVlabs' CPU comparison config: DDPM++ [1,2,2], 32x32, conditional, float32, no aug."""
    c = default_config()
    c.data.update(resolution=32, channels=3, use_labels=True)
    c.model.update(arch="ddpmpp_cifar10", dtype="float32")
    c.model.net.update(model_channels=channels, channel_mult=(1, 2, 2), num_blocks=blocks)
    c.train.update(batch_size=batch, augment_p=0.0)
    c.ema.update(power_stds=tuple(power_stds))
    c.optim.lr_rampup_kimg = 0.0
    return c


def study_setup(config):
    """(model, one-device mesh, state shardings, initial state) of a study config."""
    model = build_model_from_config(
        config, types.SimpleNamespace(resolution=32, channels=3, num_classes=10)
    )
    mesh = make_mesh(jax.devices()[:1])
    init = functools.partial(init_state, model=model, config=config)
    shardings = state_sharding(jax.eval_shape(init, jax.random.key(0)), mesh)
    return model, mesh, shardings, jax.jit(init, out_shardings=shardings)(jax.random.key(0))


def conv_ms(batch: int, channels: int, repeats: int) -> dict:
    """A bare 3x3 conv, NHWC, forward and forward+backward."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (batch, 32, 32, channels))
    w = jax.random.normal(k2, (3, 3, channels, channels)) * 0.05
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    fwd = jax.jit(conv)
    bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    return {"conv3x3_fwd": _ms(fwd, x, w, repeats=repeats),
            "conv3x3_fwd_bwd": _ms(bwd, x, w, repeats=repeats)}  # fmt: skip


def main() -> None:
    """Time each part of the step; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    config = study_config(a.batch, a.channels)
    model, mesh, shardings, state = study_setup(config)
    kx, ky, kr = jax.random.split(jax.random.key(1), 3)
    batch = {"image": jax.random.uniform(kx, (a.batch, 32, 32, 3), minval=-1, maxval=1),
             "label": jax.random.randint(ky, (a.batch,), 0, 10)}  # fmt: skip
    sigma = jnp.full((a.batch,), 1.0)
    hp = StepConfig.from_config(config)
    loss_fn = make_loss_fn(model, hp)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, k, b: loss_fn(k, p, b)[0]))
    _, grads = grad_fn(state.params, kr, batch)
    tx = make_optimizer(config.optim, a.batch)
    r = a.repeats
    out = {
        "forward": _ms(jax.jit(lambda p, x: model.denoise(p, x, sigma, train=True, rng=kr,
                                                           labels=batch["label"])),
                       state.params, batch["image"], repeats=r),
        "loss_forward": _ms(jax.jit(lambda p, b: loss_fn(kr, p, b)[0]), state.params, batch,
                            repeats=r),
        "forward_backward": _ms(grad_fn, state.params, kr, batch, repeats=r),
        "augment_p0.12": _ms(jax.jit(lambda k, x: augment(k, x, p=0.12)), kr, batch["image"],
                             repeats=r),
        "nan_to_num_grad_norm": _ms(jax.jit(lambda g: (
            jax.tree.map(jnp.nan_to_num, g),
            jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g))))), grads, repeats=r),
        "adam": _ms(jax.jit(lambda g, o, p: tx.update(g, o, p)), grads, state.opt_state,
                    state.params, repeats=r),
        "ema": _ms(jax.jit(lambda e, p: ema_update(e, p, jnp.float32(0.999))), state.ema, state.params,
                   repeats=r),
        "ema_and_2_power_emas": _ms(jax.jit(lambda s, p: _update_emas(s, p, hp)),
                                    state, state.params, repeats=r),
    }  # fmt: skip
    step = make_train_step(model, config, mesh, shardings)
    b_dev = jax.device_put(batch, batch_sharding(mesh))
    times = []
    for i in range(r + 1):
        t0 = time.perf_counter()
        state, m = step(state, b_dev)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0) if i else None
    out["train_step"] = round(1e3 * statistics.median(times), 2)
    out["train_img_per_s"] = round(a.batch / (out["train_step"] / 1e3), 2)
    out.update(conv_ms(a.batch, a.channels, r))
    print(json.dumps({"benchmark": "train_breakdown_ms", "backend": jax.default_backend(),
                      "batch": a.batch, "channels": a.channels, "results": out}))  # fmt: skip


if __name__ == "__main__":
    main()
