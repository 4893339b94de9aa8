"""Per-step overhead of every sampler (trivial denoiser) and steps/s with a small conv net.

Prints JSON. Usage: python benchmarks/bench_samplers.py [--steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax import samplers, schedules


class SmallConvNet(nn.Module):
    """A 3-layer conv denoiser stand-in (about 40k parameters)."""

    @nn.compact
    def __call__(self, x, sigma):
        h = nn.Conv(32, (3, 3))(x * (1 / jnp.sqrt(sigma**2 + 0.25))[:, None, None, None])
        h = nn.Conv(32, (3, 3))(nn.silu(h))
        return x + nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def _run_fn(name, denoise, x, sigmas, steps):
    fn = samplers.SAMPLERS[name]
    rng = jax.random.key(0)
    if name == "dpm_fast":
        return jax.jit(lambda x: fn(denoise, x, 0.002, 80.0, steps))
    if name == "dpm_adaptive":
        return jax.jit(lambda x: fn(denoise, x, 0.002, 80.0, rtol=0.05, atol=0.0078))
    return jax.jit(lambda x: fn(denoise, x, sigmas, rng=rng))


def _time(f, x, repeats):
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    """Time every sampler; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conv-batch", type=int, default=8)
    args = p.parse_args()
    sigmas = schedules.karras(args.steps, 0.002, 80.0)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3)) * 80.0
    trivial = lambda x, sigma: x * 0.5  # noqa: E731
    net = SmallConvNet()
    xc = jax.random.normal(jax.random.key(2), (args.conv_batch, 32, 32, 3)) * 80.0
    params = net.init(jax.random.key(3), xc, jnp.ones(args.conv_batch))
    conv = lambda x, sigma: net.apply(params, x, sigma)  # noqa: E731
    rows = {}
    for name in sorted(samplers.SAMPLERS):
        t_triv = _time(_run_fn(name, trivial, x, sigmas, args.steps), x, args.repeats)
        t_conv = _time(_run_fn(name, conv, xc, sigmas, args.steps), xc, args.repeats)
        rows[name] = {
            "ms_per_step_trivial": round(1e3 * t_triv / args.steps, 4),
            "steps_per_s_conv": round(args.steps / t_conv, 1),
        }
    print(json.dumps({"benchmark": "samplers", "backend": jax.default_backend(),
                      "device": str(jax.devices()[0]), "steps": args.steps,
                      "conv_batch": args.conv_batch, "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
