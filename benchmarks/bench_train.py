"""Training throughput: images/s, compile time and peak memory of the sharded train step, JSON.

Cases: DDPM++ CIFAR-10 (conditional, batch 512, 32x32) and ADM ImageNet-64 (conditional,
batch 64 by default), both with the network in bf16, EDM loss, Adam, EMA, synthetic data
already on the devices (the input pipeline is measured by bench_data.py).

    python benchmarks/bench_train.py                # the full cases (for a GPU)
    python benchmarks/bench_train.py --small        # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
import types

import jax
import numpy as np

from edm_jax.nets.spec import build_model_from_config
from edm_jax.train.config_io import default_config
from edm_jax.train.state import init_state
from edm_jax.train.step import batch_sharding, make_mesh, make_train_step, state_sharding
from edm_jax.train.validate import validate_config

CASES = {
    "ddpmpp_cifar10": dict(arch="ddpmpp_cifar10", res=32, batch=512, net={}),
    "adm_imagenet64": dict(arch="adm_imagenet64", res=64, batch=64, net={}),
}
SMALL_NET = {
    "ddpmpp_cifar10": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1),
    "adm_imagenet64": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                           attn_resolutions=(8,)),
}  # fmt: skip


def case_config(name: str, batch: int, res: int, dtype: str, small: bool, remat: str):
    """Training config of one benchmark case."""
    case = CASES[name]
    c = default_config()
    c.data.update(resolution=res, channels=3, use_labels=True)
    c.model.update(arch=case["arch"], dtype=dtype)
    c.model.net.update(SMALL_NET[name] if small else case["net"])
    c.train.update(batch_size=batch, remat=remat)
    c.optim.lr_rampup_kimg = 0.0
    return c


def peak_memory_bytes() -> dict:
    """Peak device memory (where the backend reports it) and the host's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"), "host_peak_rss_bytes": rss}


def bench_case(name: str, *, batch: int, res: int, dtype: str, small: bool, steps: int,
               remat: str) -> dict:  # fmt: skip
    """Compile and time the train step of one case."""
    config = case_config(name, batch, res, dtype, small, remat)
    validate_config(config, jax.device_count())
    source = types.SimpleNamespace(
        resolution=res, channels=3, num_classes=1000 if "imagenet" in name else 10
    )
    model = build_model_from_config(config, source)
    mesh = make_mesh()
    init = functools.partial(init_state, model=model, config=config)
    shardings = state_sharding(jax.eval_shape(init, jax.random.key(0)), mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    k_x, k_y = jax.random.split(jax.random.key(1))
    batch_arrays = {
        "image": jax.random.uniform(k_x, (batch, res, res, 3), minval=-1, maxval=1),
        "label": jax.random.randint(k_y, (batch,), 0, source.num_classes),
    }
    batch_arrays = jax.device_put(batch_arrays, batch_sharding(mesh))
    step = make_train_step(model, config, mesh, shardings)
    t0 = time.time()
    compiled = step.lower(state, batch_arrays).compile()
    compile_s = time.time() - t0
    state, m = compiled(state, batch_arrays)  # warm-up
    jax.block_until_ready(m)
    t0 = time.time()
    for _ in range(steps):
        state, m = compiled(state, batch_arrays)
    jax.block_until_ready(m)
    dt = time.time() - t0
    return {
        "case": name, "batch": batch, "resolution": res, "dtype": dtype, "remat": remat,
        "params": model.num_params(jax.device_get(state.params)), "steps": steps,
        "images_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps,
        "compile_s": compile_s, "loss": float(m["loss"]), **peak_memory_bytes(),
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    """Run the chosen cases and print one JSON document."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny nets and batches (CPU smoke run)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--remat", default="none")
    p.add_argument("--batch_cifar", type=int, default=None)
    p.add_argument("--batch_adm", type=int, default=None)
    a = p.parse_args(argv)
    batches = {"ddpmpp_cifar10": a.batch_cifar, "adm_imagenet64": a.batch_adm}
    results = []
    for name in a.cases.split(","):
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; valid: {sorted(CASES)}")
        batch = batches[name] or (8 * jax.device_count() if a.small else CASES[name]["batch"])
        res = 16 if a.small else CASES[name]["res"]
        steps = a.steps or (3 if a.small else 20)
        results.append(bench_case(name, batch=batch, res=res, dtype=a.dtype, small=a.small,
                                  steps=steps, remat=a.remat))  # fmt: skip
    out = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
           "jax": jax.__version__, "small": a.small, "results": results}  # fmt: skip
    print(json.dumps(out, indent=2, default=lambda x: None if x is None else float(np.asarray(x))))
    return results


if __name__ == "__main__":
    main()
