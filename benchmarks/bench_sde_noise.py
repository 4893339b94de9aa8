"""Per-step cost of the Brownian-noise SDE samplers beside euler_ancestral, interleaved rounds.

Trivial denoiser, one 32x32x3 image, a 50-step Karras grid; medians of interleaved rounds so
that a busy machine slows every sampler alike. Prints JSON (ms per step and the ratio to
euler_ancestral). Only public APIs, so it also runs against older checkouts (PYTHONPATH).

    python benchmarks/bench_sde_noise.py [--rounds 7] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from edm_jax import samplers, schedules

NAMES = ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde"]


def main() -> None:
    """Time the samplers in interleaved rounds; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    sigmas = schedules.karras(a.steps, 0.002, 80.0)
    x = 80.0 * jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    trivial = lambda x, sigma: x * 0.5  # noqa: E731
    fns = {
        n: jax.jit(lambda x, n=n: samplers.SAMPLERS[n](trivial, x, sigmas, rng=jax.random.key(0)))
        for n in NAMES
    }
    for f in fns.values():
        jax.block_until_ready(f(x))
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    for _ in range(a.rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times[n].append(1e3 * (time.perf_counter() - t0) / a.steps)
    ms = {n: round(statistics.median(v), 4) for n, v in times.items()}
    ratio = {n: round(ms[n] / ms["euler_ancestral"], 2) for n in NAMES}
    print(json.dumps({"benchmark": "sde_noise", "backend": jax.default_backend(),
                      "steps": a.steps, "ms_per_step": ms, "ratio_to_euler_ancestral": ratio}))  # fmt: skip


if __name__ == "__main__":
    main()
