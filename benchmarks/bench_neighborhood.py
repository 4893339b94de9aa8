"""Neighbourhood attention (tiled, natten's window rule) beside global attention (prints JSON).

    python benchmarks/bench_neighborhood.py --grids 64 128 256 --kernel 7 --heads 4 --d-head 64

For each square token grid: milliseconds per forward (and forward + backward with --grad) of
``edm_jax.nets.neighborhood.neighborhood_attention`` at each --tile, and of global softmax
attention over all tokens where its [heads, L, L] logits fit --max-global-gib (global is
O(L^2): 256^2 tokens need 16 GiB of float32 logits per head). Runs on the default device;
on the CPU keep the grids small.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from edm_jax.nets.neighborhood import global_attention, neighborhood_attention


def _ms(fn, *args, steps: int) -> float:
    """Milliseconds per call after one compiling call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - start) / steps


def _timed(attn, q, k, v, grad: bool, steps: int) -> dict:
    """{'forward_ms', ['forward_backward_ms']} of one attention function."""
    out = {"forward_ms": _ms(jax.jit(attn), q, k, v, steps=steps)}
    if grad:
        loss = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) ** 2), argnums=(0, 1, 2)))
        out["forward_backward_ms"] = _ms(loss, q, k, v, steps=steps)
    return out


def bench_grid(n: int, args) -> dict:
    """Timings at an n x n token grid."""
    keys = jax.random.split(jax.random.key(n), 3)
    shape = (args.batch, n, n, args.heads, args.d_head)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    row: dict = {"grid": n, "tokens": n * n}
    for tile in args.tiles:
        attn = lambda q, k, v, t=tile: neighborhood_attention(q, k, v, args.kernel, tile=t)  # noqa: E731
        row[f"neighborhood_tile{tile}"] = _timed(attn, q, k, v, args.grad, args.steps)
    gib = args.batch * args.heads * (n * n) ** 2 * 4 / 2**30
    if gib <= args.max_global_gib:
        row["global"] = _timed(global_attention, q, k, v, args.grad, args.steps)
    else:
        row["global"] = f"skipped: {gib:.1f} GiB of logits > --max-global-gib {args.max_global_gib}"
    return row


def main() -> None:
    """Parse flags, time every grid, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--tiles", type=int, nargs="+", default=[8, 16])
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grad", action="store_true", help="also time forward + backward")
    p.add_argument("--max-global-gib", type=float, default=8.0)
    args = p.parse_args()
    rows = [bench_grid(n, args) for n in args.grids]
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "device": f"{device.platform}:{device.device_kind}",
                "kernel": args.kernel,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
