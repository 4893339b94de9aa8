"""Per-step overhead of every sampler (trivial denoiser) and steps/s with a small conv net.

Prints JSON. Usage: python benchmarks/bench_samplers.py [--steps 50] [--repeats 5]
A step is one scan iteration (an attempted step for dpm_adaptive, an evaluation for dpm_fast).
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax import samplers, schedules

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class SmallConvNet(nn.Module):
    """A 3-layer conv denoiser stand-in (about 10k parameters)."""

    @nn.compact
    def __call__(self, x, sigma):
        h = nn.Conv(32, (3, 3))(x * (1 / jnp.sqrt(sigma**2 + 0.25))[:, None, None, None])
        h = nn.Conv(32, (3, 3))(nn.silu(h))
        return x + nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def _program(name, denoise, sigmas, steps):
    """(jitted x -> (x, step count)) for sampler `name`, called as its registry entry says."""
    rng = jax.random.key(0)
    if name == "edm_sampler":  # NVlabs/edm's own convention, not in the registry
        fn = lambda x: samplers.edm_sampler(denoise, x / SIGMA_MAX, num_steps=steps)  # noqa: E731
        return jax.jit(lambda x: (fn(x), jnp.asarray(steps)))
    info = samplers.sampler_info(name)
    if info.takes == "grid":
        fn = lambda x: info.fn(denoise, x, sigmas, rng=rng)  # noqa: E731
    elif info.takes_n:  # a fixed number of evaluations
        fn = lambda x: info.fn(denoise, x, SIGMA_MIN, SIGMA_MAX, steps, rng=rng)  # noqa: E731
    else:  # adaptive: its attempted steps come back in the info dict
        out = lambda x: info.fn(denoise, x, SIGMA_MIN, SIGMA_MAX, rng=rng, return_info=True)  # noqa: E731
        return jax.jit(lambda x: (lambda o: (o[0], o[1]["steps"]))(out(x)))
    return jax.jit(lambda x: (fn(x), jnp.asarray(steps)))


def _time(f, x, repeats):
    """(compile + first run seconds, best run seconds, step count)."""
    t0 = time.perf_counter()
    _, n = jax.block_until_ready(f(x))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return first, best, int(n)


def main() -> None:
    """Time every sampler; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conv-batch", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None, help="sampler names (default: all)")
    args = p.parse_args()
    sigmas = schedules.karras(args.steps, SIGMA_MIN, SIGMA_MAX)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3)) * SIGMA_MAX
    trivial = lambda x, sigma: x * 0.5  # noqa: E731
    net = SmallConvNet()
    xc = jax.random.normal(jax.random.key(2), (args.conv_batch, 32, 32, 3)) * SIGMA_MAX
    params = net.init(jax.random.key(3), xc, jnp.ones(args.conv_batch))
    conv = lambda x, sigma: net.apply(params, x, sigma)  # noqa: E731
    rows = {}
    for name in args.only or sorted(samplers.SAMPLERS) + ["edm_sampler"]:
        compile_s, t_triv, n = _time(_program(name, trivial, sigmas, args.steps), x, args.repeats)
        _, t_conv, n_conv = _time(_program(name, conv, sigmas, args.steps), xc, args.repeats)
        rows[name] = {
            "ms_per_step_trivial": round(1e3 * t_triv / n, 4),
            "steps": n,
            "compile_s": round(compile_s, 2),
            "steps_per_s_conv": round(n_conv / t_conv, 1),
        }
    print(json.dumps({"benchmark": "samplers", "backend": jax.default_backend(),
                      "device": str(jax.devices()[0]), "steps": args.steps,
                      "image": [1, 32, 32, 3], "conv_batch": args.conv_batch,
                      "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
