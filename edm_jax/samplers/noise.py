"""Noise for the stochastic samplers: ``noise_sampler(sigma, sigma_next)`` -> N(0, I) like x.

Both defaults draw per sample from ``rng`` (fold_in of the sample index), so a sample does not
depend on the batch it is drawn in. ``brownian_noise_sampler`` returns normalised increments
of one fixed Brownian path W(sigma) per sample (as k-diffusion's BrownianTreeNoiseSampler), so
the SDE samplers follow the same path whatever their step count.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
NoiseSampler = Callable[[Array, Array], Array]


def _sample_keys(rng: Array, batch: int) -> Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))  # [B]


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


def _bridge(w_a, w_b, s_a, s_b, s, z):
    """W(s) given W(s_a) = w_a and W(s_b) = w_b: the Brownian bridge (Levy's construction)."""
    span = jnp.maximum(s_b - s_a, jnp.finfo(jnp.result_type(s_a)).tiny)
    frac = (s - s_a) / span
    std = jnp.sqrt(jnp.maximum((s - s_a) * (s_b - s) / span, 0.0))
    return w_a + frac * (w_b - w_a) + std * z


def _path_normals(key: Array, r, depth: int, shape, dtype) -> Array:
    """[depth + 2, ...] N(0, I) of the nodes on r's path: root, levels 1..depth, leaf.

    The node of level k >= 1 bisects interval p = floor(r 2^(k-1)) of level k-1 and is keyed
    by its heap number 2^(k-1) + p (the root by 0), so every sigma reads the same values.
    """
    level = jnp.arange(depth + 2)
    width = 2 ** jnp.maximum(level - 1, 0)  # intervals at level k - 1
    parent = jnp.minimum(jnp.floor(r * width.astype(dtype)).astype(jnp.int32), width - 1)
    heap = jnp.where(level == 0, 0, width + parent)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(heap)
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def _brownian_value(key: Array, sigma, lo, hi, depth: int, shape, dtype) -> Array:
    """W(sigma) of the Brownian path keyed by `key` on [lo, hi], W(lo) = 0.

    A binary tree in log sigma (fine where sigma is small, where samplers step finely):
    each node's value is the bridge between its interval's ends, so W(sigma) is one fixed
    function of sigma whatever the queries. The leaf is bridged too.
    """
    log_lo = jnp.log(lo)
    log_span = jnp.maximum(jnp.log(hi) - log_lo, jnp.finfo(dtype).tiny)
    r = jnp.clip((jnp.log(sigma) - log_lo) / log_span, 0.0, 1.0)  # position in [0, 1]
    z = _path_normals(key, r, depth, shape, dtype)  # [depth + 2, ...]
    state = (lo, hi, jnp.zeros(shape, dtype), jnp.sqrt(hi - lo) * z[0], jnp.zeros([], dtype))

    def level(state, inputs):
        k, z_k = inputs
        s_a, s_b, w_a, w_b, r_a = state
        r_mid = r_a + 0.5**k
        s_mid = jnp.exp(log_lo + r_mid * log_span)
        w_mid = _bridge(w_a, w_b, s_a, s_b, s_mid, z_k)
        pick = lambda a, b: jnp.where(r >= r_mid, a, b)  # noqa: E731
        new = (pick(s_mid, s_a), pick(s_b, s_mid), pick(w_mid, w_a), pick(w_b, w_mid))
        return (*new, pick(r_mid, r_a)), None

    xs = (jnp.arange(1, depth + 1), z[1 : depth + 1])
    (s_a, s_b, w_a, w_b, _), _ = jax.lax.scan(level, state, xs, unroll=4)
    return _bridge(w_a, w_b, s_a, s_b, sigma, z[depth + 1])


def brownian_noise_sampler(
    rng: Array, x: Array, sigma_min, sigma_max, depth: int = 16
) -> NoiseSampler:
    """Brownian-tree noise per sample (as k-diffusion's BrownianTreeNoiseSampler).

    One Brownian path W over [sigma_min, sigma_max] per sample, resolved to a relative
    2^-depth of the log-sigma range; returns (W(sigma_next) - W(sigma)) / sqrt(|sigma_next -
    sigma|), sigmas clipped to the range.
    """
    if not isinstance(depth, int) or not 1 <= depth <= 30:
        raise ValueError(f"depth must be an int in [1, 30], got {depth!r}")
    keys = _sample_keys(rng, x.shape[0])
    lo, hi = jnp.asarray(sigma_min, x.dtype), jnp.asarray(sigma_max, x.dtype)

    def w_at(sigmas) -> Array:  # [2] -> [B, 2, ...]
        one = lambda k, sg: _brownian_value(k, sg, lo, hi, depth, x.shape[1:], x.dtype)  # noqa: E731
        return jax.vmap(lambda k: jax.vmap(lambda sg: one(k, sg))(sigmas))(keys)

    def sample(sigma, sigma_next) -> Array:
        a = jnp.clip(jnp.asarray(sigma, x.dtype), lo, hi)
        b = jnp.clip(jnp.asarray(sigma_next, x.dtype), lo, hi)
        scale = jnp.sqrt(jnp.maximum(jnp.abs(b - a), jnp.finfo(x.dtype).tiny))
        w = w_at(jnp.stack([a, b]))
        return (w[:, 1] - w[:, 0]) / scale

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
