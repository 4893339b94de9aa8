"""Shared pieces of the samplers: the scan driver, ODE derivative, ancestral split, noise.

Noise: ``noise_sampler(sigma, sigma_next)`` returns standard-normal noise shaped like x.
The defaults draw it per sample from ``rng`` (fold_in of the sample index), so a sample
does not depend on the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]
NoiseSampler = Callable[[Array, Array], Array]


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
    sigmas = jnp.asarray(sigmas, x.dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of at least 2 values ending in 0, got shape {sigmas.shape}"
        )
    return x, sigmas


def scan_steps(step: Callable, carry, num_steps: int, return_trajectory: bool):
    """Run ``step(carry, i) -> (carry, (x, denoised))`` for i < num_steps as one lax.scan."""

    def body(c, i):
        c, out = step(c, i)
        return c, (out if return_trajectory else None)

    carry, traj = jax.lax.scan(body, carry, jnp.arange(num_steps))
    return carry, (None if traj is None else {"x": traj[0], "denoised": traj[1]})


def finish(x: Array, traj, return_trajectory: bool):
    """x, or (x, trajectory dict) when asked for."""
    return (x, traj) if return_trajectory else x


def _sample_keys(rng: Array, batch: int) -> Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def _fold_float(key: Array, v) -> Array:
    bits = jax.lax.bitcast_convert_type(jnp.asarray(v, jnp.float32), jnp.uint32)
    return jax.random.fold_in(key, bits)


def default_noise_sampler(rng: Array, x: Array) -> NoiseSampler:
    """Per-sample Gaussian noise, keyed by (sample index, sigma, sigma_next)."""
    keys = _sample_keys(rng, x.shape[0])

    def sample(sigma, sigma_next) -> Array:
        def one(k):
            k = _fold_float(_fold_float(k, sigma), sigma_next)
            return jax.random.normal(k, x.shape[1:], x.dtype)

        return jax.vmap(one)(keys)

    return sample


def brownian_noise_sampler(
    rng: Array, x: Array, sigma_min, sigma_max, tol: float = 1e-6
) -> NoiseSampler:
    """Brownian-tree noise per sample (as k-diffusion's BrownianTreeNoiseSampler).

    The same Brownian path over [sigma_min, sigma_max] is used whatever the step count;
    returns (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|).
    """
    keys = _sample_keys(rng, x.shape[0])
    lo_all = jnp.asarray(sigma_min, x.dtype)
    hi_all = jnp.asarray(sigma_max, x.dtype)
    tol = float(tol)

    def sample(sigma, sigma_next) -> Array:
        a = jnp.clip(jnp.asarray(sigma, x.dtype), lo_all, hi_all)
        b = jnp.clip(jnp.asarray(sigma_next, x.dtype), lo_all, hi_all)
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        sign = jnp.where(b >= a, 1.0, -1.0).astype(x.dtype)

        def one(k):
            tree = diffrax.VirtualBrownianTree(lo_all, hi_all, tol=tol, shape=x.shape[1:], key=k)
            return tree.evaluate(lo, hi).astype(x.dtype)

        w = jax.vmap(one)(keys)
        return sign * w / jnp.sqrt(jnp.maximum(hi - lo, jnp.finfo(x.dtype).tiny))

    return sample


def resolve_noise(
    noise_sampler: NoiseSampler | None, rng: Array | None, x: Array, name: str
) -> NoiseSampler:
    """The user's noise_sampler, else per-sample noise from rng; ValueError if neither."""
    if noise_sampler is not None:
        return noise_sampler
    if rng is None:
        raise ValueError(
            f"sampler {name!r} adds noise: pass rng=jax.random.key(seed) or noise_sampler="
        )
    return default_noise_sampler(rng, x)


def resolve_brownian(
    noise_sampler: NoiseSampler | None, rng: Array | None, x: Array, sigmas: Array, name: str
) -> NoiseSampler:
    """The user's noise_sampler, else Brownian-tree noise over the grid's positive range."""
    if noise_sampler is not None:
        return noise_sampler
    if rng is None:
        raise ValueError(
            f"sampler {name!r} adds noise: pass rng=jax.random.key(seed) or noise_sampler="
        )
    positive = jnp.where(sigmas > 0, sigmas, jnp.inf)
    return brownian_noise_sampler(rng, x, jnp.min(positive), jnp.max(sigmas))


def is_zero(value) -> bool:
    """True if value is a concrete 0 (so no noise is needed)."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False
