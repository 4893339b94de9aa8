"""Network throughput: forward and forward+backward images/s, printed as JSON.

DDPM++ CIFAR-10 conditional (batch 512) and ADM ImageNet-64 conditional (batch 256), float32
and bf16 compute. Forward = the preconditioned denoiser D(x; sigma); forward+backward = the
gradient of the EDM training loss with dropout on. ``--small`` (CPU smoke test) shrinks the
batch, the iteration count and the network width so that it finishes in minutes.

    python benchmarks/bench_nets.py [--small] [--models ddpmpp_cifar10 adm_imagenet64]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from edm_jax.losses import edm_loss
from edm_jax.nets import build_model

# name -> (preset, build_model kwargs, full-size batch)
CASES = {
    "ddpmpp_cifar10": (
        "ddpmpp_cifar10",
        dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9),
        512,
    ),
    "adm_imagenet64": (
        "adm_imagenet64",
        dict(img_resolution=64, img_channels=3, label_dim=1000),
        256,
    ),
}


def timed(fn, args, iters: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call incl. compilation, mean seconds per call after warmup)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t0) / iters


def make_inputs(model, batch: int, rng) -> tuple:
    """Random images in [-1, 1], sigma from the EDM training density, integer labels."""
    kx, ks, kl = jax.random.split(rng, 3)
    r, c = model.img_resolution, model.img_channels
    x = jax.random.uniform(kx, (batch, r, r, c), minval=-1, maxval=1)
    sigma = jnp.exp(jax.random.normal(ks, (batch,)) * 1.2 - 1.2)
    labels = jax.random.randint(kl, (batch,), 0, max(model.label_dim, 1))
    return x, sigma, labels


def bench_case(name: str, dtype: str, batch: int, iters: int, warmup: int, overrides: dict) -> dict:
    """Forward and forward+backward throughput of one model at one compute dtype."""
    preset, kw, _ = CASES[name]
    model = build_model(preset, dtype=dtype, **kw, **overrides)
    params = jax.jit(model.init)(jax.random.key(0))
    x, sigma, labels = make_inputs(model, batch, jax.random.key(1))
    fwd = jax.jit(lambda p, x, s, l: model.denoise(p, x, s, l))

    @jax.jit
    def fwd_bwd(p, x, labels, rng):
        denoise = functools.partial(model.denoise, train=True, rng=jax.random.fold_in(rng, 1))
        batch_ = {"image": x, "label": labels}
        return jax.grad(lambda p: edm_loss(rng, p, batch_, denoise=denoise)[0])(p)

    f_first, f_s = timed(fwd, (params, x, sigma, labels), iters, warmup)
    b_first, b_s = timed(fwd_bwd, (params, x, labels, jax.random.key(2)), iters, warmup)
    return {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "num_params": model.num_params(params),
        "overrides": overrides,
        "forward_img_per_s": round(batch / f_s, 2),
        "fwd_bwd_img_per_s": round(batch / b_s, 2),
        "forward_ms_per_batch": round(1e3 * f_s, 2),
        "fwd_bwd_ms_per_batch": round(1e3 * b_s, 2),
        "first_call_s": {"forward": round(f_first, 2), "fwd_bwd": round(b_first, 2)},
    }


def write_atomic(path: str, text: str) -> None:
    """Write text to path through a temporary file and os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16"],
    )
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--small", action="store_true", help="CPU smoke test: batch 2, 2 iters, width 32"
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark and print the JSON report."""
    args = parse_args(argv)
    overrides = dict(model_channels=32) if args.small else {}
    iters, warmup = (2, 1) if args.small else (args.iters, args.warmup)
    results = []
    for name in args.models:
        batch = args.batch or (2 if args.small else CASES[name][2])
        for dtype in args.dtypes:
            results.append(bench_case(name, dtype, batch, iters, warmup, overrides))
    report = {
        "benchmark": "nets",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "small": args.small,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
