"""Shared pieces of the samplers: the scan driver, ODE derivative, ancestral split."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from edm_jax.checks import check_sigmas
from edm_jax.types import Array, Denoiser, StepCallback


def append_dims(v: Array, ndim: int) -> Array:
    """[B] or [] -> broadcastable against an ndim array."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def to_d(x: Array, sigma: Array, denoised: Array) -> Array:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def call(denoise: Denoiser, x: Array, sigma) -> Array:
    """D(x; sigma) with sigma broadcast to [B], in x's dtype."""
    sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    return denoise(x, sigma_b).astype(x.dtype)


def ancestral_step(sigma_from: Array, sigma_to: Array, eta=1.0) -> tuple[Array, Array]:
    """(sigma_down, sigma_up) splitting an ancestral step into a deterministic and a noise part."""
    var = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(jnp.maximum(var, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def prepare(x: Array, sigmas: Array) -> tuple[Array, Array]:
    """x as a float array and sigmas in its dtype; validates the grid's shape."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    check_sigmas(sigmas)  # concrete grids: finite, >= 0, non-increasing (traced: unchecked)
    sigmas = jnp.asarray(sigmas, x.dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of at least 2 values ending in 0, got shape {sigmas.shape}"
        )
    return x, sigmas


def with_extra_args(denoise: Denoiser, extra_args: dict | None) -> Denoiser:
    """k-diffusion's ``extra_args``: keywords passed to every denoiser call."""
    if extra_args is None:
        return denoise
    if not isinstance(extra_args, dict):
        raise ValueError(f"extra_args must be a dict of keyword arguments, got {extra_args!r}")
    return functools.partial(denoise, **extra_args) if extra_args else denoise


def emit(callback: StepCallback | None, info: dict[str, Any]) -> None:
    """Send k-diffusion's per-step info dict to ``callback`` on the host (nothing when None)."""
    if callback is not None:
        jax.debug.callback(callback, info, ordered=True)


def scan_steps(
    step: Callable,
    carry,
    num_steps: int,
    return_trajectory: bool,
    callback: StepCallback | None = None,
    sigmas: Array | None = None,
):
    """Run ``step(carry, i) -> (carry, (x, denoised[, sigma_hat]))`` for i < num_steps as one
    lax.scan; ``callback`` gets {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} per step."""

    def body(c, i):
        c, out = step(c, i)
        if callback is not None:
            sigma = sigmas[i]  # type: ignore[index]
            sigma_hat = out[2] if len(out) > 2 else sigma
            info = {"x": out[0], "i": i, "sigma": sigma, "sigma_hat": sigma_hat}
            emit(callback, info | {"denoised": out[1]})
        return c, (out[:2] if return_trajectory else None)

    carry, traj = jax.lax.scan(body, carry, jnp.arange(num_steps))
    return carry, (None if traj is None else {"x": traj[0], "denoised": traj[1]})


def finish(x: Array, traj, return_trajectory: bool):
    """x, or (x, trajectory dict) when asked for."""
    return (x, traj) if return_trajectory else x


def is_zero(value) -> bool:
    """True if value is a concrete 0 (so no noise is needed)."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False
