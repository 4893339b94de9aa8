"""EDM2's ``edm_sampler`` (NVlabs/edm2 generate_images.py): Heun with optional churn, one scan.

Differences from NVlabs/edm's sampler that this reproduces: the time steps and the state are
computed in ``dtype`` (float32 by default, so t_0 = 79.999985 rather than 80), the denoiser's
output is cast to ``dtype``, and the last step is a plain Euler step (no second-order
correction towards sigma = 0). Guidance is applied by the denoiser (``edm_jax.guidance``).
It stays outside the registry (``edm_jax.samplers.SAMPLERS``, k-diffusion's calling convention)
as an exact-port function: the reference's ``denoise(x, sigma)`` with a 0-d sigma, for parity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["edm2_time_steps", "sample_edm2"]


def edm2_time_steps(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    dtype=jnp.float32,
) -> Array:  # fmt: skip
    """t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho in dtype, then t_N = 0."""
    if num_steps < 2:
        raise ValueError(
            f"num_steps must be >= 2 (the discretisation divides by N-1); got {num_steps}"
        )
    d = np.dtype(dtype)
    i = np.arange(num_steps, dtype=d)
    a = d.type(sigma_max ** (1 / rho))
    b = d.type(sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    base = a + i / d.type(num_steps - 1) * b  # in dtype, as the reference
    t = (base.astype(np.float64) ** rho).astype(d)  # correctly rounded pow (numpy's powf is not)
    return jnp.asarray(np.concatenate([t, np.zeros(1, d)]))


def sample_edm2(
    denoise: Callable[[Array, Array], Array],
    x: Array,
    sigmas: Array,
    *,
    rng: Array | None = None,
    noise_sampler: Callable[[Array, Array], Array] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Array:
    """EDM2 edm_sampler from x = noise * sigmas[0] over sigmas (ending in 0), in x's dtype.

    ``denoise(x, sigma)`` gets a 0-d sigma (one level for the batch), as the reference calls
    its nets. Churn (gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= t <= s_tmax) draws
    ``noise_sampler(t_cur, t_next)`` or, by default, per-sample normal noise from rng.
    """
    dtype = x.dtype
    sigmas = jnp.asarray(sigmas, dtype)
    n = sigmas.shape[0] - 1
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 else 0.0
    if s_churn > 0 and noise_sampler is None:
        if rng is None:
            raise ValueError("s_churn > 0 needs rng or noise_sampler")
        noise_sampler = _default_noise(rng, x)

    def churned(x_cur, t_cur, t_next, euler):
        """(x_hat, t_hat): noise increased temporarily (EDM Algorithm 2, lines 4-6)."""
        if s_churn <= 0:
            return x_cur, t_cur
        churn = euler & (s_tmin <= t_cur) & (t_cur <= s_tmax)
        t_hat = jnp.where(churn, t_cur + dtype.type(gamma) * t_cur, t_cur)
        eps = jax.lax.cond(
            churn,
            lambda: noise_sampler(t_cur, t_next).astype(dtype),
            lambda: jnp.zeros_like(x_cur),
        )
        spread = jnp.sqrt(jnp.maximum(t_hat**2 - t_cur**2, 0))  # >= 0 despite fused mul-adds
        return jnp.where(churn, x_cur + spread * dtype.type(s_noise) * eps, x_cur), t_hat

    def evaluation(carry, k):
        """Evaluation k of 2N-1: the Euler step of step k//2 (k even) or its correction."""
        x, x_hat, t_hat, d_cur = carry
        i, euler = k // 2, k % 2 == 0
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_h, t_h = churned(x, t_cur, t_next, euler)
        x_hat, t_hat = jnp.where(euler, x_h, x_hat), jnp.where(euler, t_h, t_hat)
        x_in, t_in = jnp.where(euler, x_hat, x), jnp.where(euler, t_hat, t_next)
        d = (x_in - denoise(x_in, t_in).astype(dtype)) / t_in
        half = dtype.type(0.5)
        x_euler = x_hat + (t_next - t_hat) * d
        x_heun = x_hat + (t_next - t_hat) * (half * d_cur + half * d)  # 2nd order (i < N-1)
        d_cur = jnp.where(euler, d, d_cur)
        return (jnp.where(euler, x_euler, x_heun), x_hat, t_hat, d_cur), None

    carry = (x, x, sigmas[0], jnp.zeros_like(x))
    out, _ = jax.lax.scan(evaluation, carry, jnp.arange(2 * n - 1))  # type: ignore[arg-type]
    return out[0]


def _default_noise(rng: Array, x: Array) -> Callable[[Array, Array], Array]:
    """Standard normal noise like x, one key per sample and per sigma (batch-independent)."""

    def sample(sigma, sigma_next):
        k = jax.random.fold_in(
            rng, jax.lax.bitcast_convert_type(sigma.astype(jnp.float32), jnp.int32)
        )
        keys = jax.vmap(lambda b: jax.random.fold_in(k, b))(jnp.arange(x.shape[0]))
        return jax.vmap(lambda kk: jax.random.normal(kk, x.shape[1:], x.dtype))(keys)

    return sample
