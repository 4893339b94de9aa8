"""Noise for the stochastic samplers: ``noise_sampler(sigma, sigma_next)`` -> N(0, I) like x.

Both defaults draw per sample from ``rng`` (fold_in of the sample index), so a sample does not
depend on the batch it is drawn in. ``brownian_noise_sampler`` returns normalised increments
of one fixed Brownian path W(sigma) per sample (as k-diffusion's BrownianTreeNoiseSampler), so
the SDE samplers follow the same path whatever their step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from edm_jax.hashrng import mix32, normal_from_bits

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


def _node_normals(seed: Array, nodes: Array, shape, dtype) -> Array:
    """[*nodes.shape, *shape] N(0, 1), one per (tree node, element), keyed by seed uint32[2].

    A counter-based hash of (seed, node, element) and the inverse error function: about 15x
    cheaper than threefry per value on the CPU, and random access by node number.
    """
    size = math.prod(shape)
    elem = mix32(jnp.arange(size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed[1])  # [D]
    node = mix32(mix32(nodes.astype(jnp.uint32) ^ seed[0]) + jnp.uint32(0x632BE5AB))  # [...]
    bits = mix32(mix32(node[..., None] ^ elem) + seed[1])  # [..., D]
    return normal_from_bits(bits, dtype).reshape(*nodes.shape, *shape)


def _path(sigma, lo, hi, depth: int) -> tuple[Array, Array]:
    """(heap numbers [depth + 2], coefficients [depth + 2]) with W(sigma) = sum_k c_k z_k.

    W on [lo, hi] (W(lo) = 0) is a binary tree in log sigma, fine where sigma is small: the
    root is W(hi) = sqrt(hi - lo) z_0, the node of level k >= 1 is the Brownian bridge at the
    midpoint of interval p = floor(r 2^(k-1)) of level k - 1 (heap number 2^(k-1) + p), and a
    last bridge reaches sigma inside its leaf. Every value is linear in the node normals, so
    only scalars walk the tree; W(sigma) is one fixed function of sigma whatever the queries.
    """
    dtype = jnp.result_type(lo)
    log_lo = jnp.log(lo)
    log_span = jnp.maximum(jnp.log(hi) - log_lo, jnp.finfo(dtype).tiny)
    r = jnp.clip((jnp.log(sigma) - log_lo) / log_span, 0.0, 1.0)  # position in [0, 1]
    level = jnp.arange(depth + 2)
    width = 2 ** jnp.maximum(level - 1, 0)  # intervals at level k - 1
    parent = jnp.minimum(jnp.floor(r * width.astype(dtype)).astype(jnp.int32), width - 1)
    heap = jnp.where(level == 0, 0, width + parent)
    unit = jnp.eye(depth + 2, dtype=dtype)
    state = (lo, hi, jnp.zeros(depth + 2, dtype), jnp.sqrt(hi - lo) * unit[0], jnp.zeros([], dtype))

    def bridge(c_a, c_b, s_a, s_b, s, k):
        span = jnp.maximum(s_b - s_a, jnp.finfo(dtype).tiny)
        std = jnp.sqrt(jnp.maximum((s - s_a) * (s_b - s) / span, 0.0))
        return c_a + ((s - s_a) / span) * (c_b - c_a) + std * unit[k]

    def descend(state, k):
        s_a, s_b, c_a, c_b, r_a = state
        r_mid = r_a + jnp.asarray(0.5, dtype) ** k  # dtype kept under x64 (k is int64 there)
        s_mid = jnp.exp(log_lo + r_mid * log_span)
        c_mid = bridge(c_a, c_b, s_a, s_b, s_mid, k)
        pick = lambda a, b: jnp.where(r >= r_mid, a, b)  # noqa: E731
        new = (pick(s_mid, s_a), pick(s_b, s_mid), pick(c_mid, c_a), pick(c_b, c_mid))
        return (*new, pick(r_mid, r_a)), None

    (s_a, s_b, c_a, c_b, _), _ = jax.lax.scan(descend, state, jnp.arange(1, depth + 1))
    return heap, bridge(c_a, c_b, s_a, s_b, sigma, depth + 1)


def _brownian_values(seed: Array, sigmas: Array, lo, hi, depth: int, shape, dtype) -> Array:
    """[K, ...] W(sigma_k) of the path keyed by seed uint32[2], for sigmas [K].

    The top levels (heap numbers < 2^T, about K nodes) are drawn once and shared by all K
    paths; only the deeper nodes are drawn per sigma.
    """
    k = sigmas.shape[0]
    top = min(depth + 1, max(1, math.ceil(math.log2(k))))  # levels 0..top have heap < 2^top
    heap, coef = jax.vmap(lambda s: _path(s, lo, hi, depth))(sigmas)  # [K, L], [K, L]
    rows = jnp.arange(k)[:, None]
    dense = jnp.zeros((k, 2**top), dtype).at[rows, heap[:, : top + 1]].add(coef[:, : top + 1])
    z_top = _node_normals(seed, jnp.arange(2**top), (math.prod(shape),), dtype)  # [2^T, D]
    z_deep = _node_normals(seed, heap[:, top + 1 :], shape, dtype)  # [K, L - T - 1, ...]
    w_top = (dense @ z_top).reshape(k, *shape)
    return w_top + jnp.einsum("kl,kl...->k...", coef[:, top + 1 :], z_deep)


def _sample_seeds(rng: Array, batch: int) -> Array:
    """[B, 2] uint32 seeds, one per sample (fold_in of the sample index)."""
    return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(_sample_keys(rng, batch))


def _nearest(table: Array, s: Array) -> tuple[Array, Array]:
    """(index of the table entry nearest s, whether it equals s to a few dozen ulps)."""
    i = jnp.argmin(jnp.abs(table - s))
    return i, jnp.abs(table[i] - s) <= 64 * jnp.finfo(table.dtype).eps * s


def brownian_noise_sampler(
    rng: Array, x: Array, sigma_min, sigma_max, depth: int = 16, grid: Array | None = None
) -> NoiseSampler:
    """Brownian-tree noise per sample (as k-diffusion's BrownianTreeNoiseSampler).

    One Brownian path W over [sigma_min, sigma_max] per sample, resolved to a relative
    2^-depth of the log-sigma range; returns (W(sigma_next) - W(sigma)) / sqrt(|sigma_next -
    sigma|), sigmas clipped to the range. With `grid` (the sigmas a sampler will query, may be
    traced), W is built at all of them in one vectorised pass up front and each call reads
    that table; other sigmas walk the tree. The values are the same either way.
    """
    if not isinstance(depth, int) or not 1 <= depth <= 30:
        raise ValueError(f"depth must be an int in [1, 30], got {depth!r}")
    seeds = _sample_seeds(rng, x.shape[0])  # [B, 2]
    lo, hi = jnp.asarray(sigma_min, x.dtype), jnp.asarray(sigma_max, x.dtype)
    clip = lambda s: jnp.clip(jnp.asarray(s, x.dtype), lo, hi)  # noqa: E731

    def w_at(sigmas) -> Array:  # [K] -> [B, K, ...]
        one = lambda seed: _brownian_values(seed, sigmas, lo, hi, depth, x.shape[1:], x.dtype)  # noqa: E731
        return jax.vmap(one)(seeds)

    if grid is None:
        read = w_at
    else:
        table = clip(jnp.ravel(grid))  # [K]
        w_table = w_at(table)  # [B, K, ...]

        def read(ab):
            (i, hit_a), (j, hit_b) = _nearest(table, ab[0]), _nearest(table, ab[1])
            from_table = lambda: w_table[:, jnp.stack([i, j])]  # noqa: E731
            return jax.lax.cond(hit_a & hit_b, from_table, lambda: w_at(ab))

    def sample(sigma, sigma_next) -> Array:
        a, b = clip(sigma), clip(sigma_next)
        scale = jnp.sqrt(jnp.maximum(jnp.abs(b - a), jnp.finfo(x.dtype).tiny))
        w = read(jnp.stack([a, b]))
        return (w[:, 1] - w[:, 0]) / scale

    return sample


def sde_midpoints(sigmas: Array, r) -> Array:
    """sigma(t + r h) between consecutive positive sigmas (dpmpp_sde's stage), t = -log sigma."""
    t, t_next = -jnp.log(sigmas[:-1]), -jnp.log(sigmas[1:])
    mid = jnp.exp(-(t + (t_next - t) * r))
    return jnp.where(sigmas[1:] > 0, mid, sigmas[:-1])


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
    noise_sampler: NoiseSampler | None,
    rng: Array | None,
    x: Array,
    sigmas: Array,
    name: str,
    r=None,
) -> NoiseSampler:
    """The user's noise_sampler, else Brownian-tree noise over the grid's positive range.

    W is tabulated up front at the grid (and at dpmpp_sde's stage sigmas when `r` is given).
    """
    if noise_sampler is not None:
        return noise_sampler
    if rng is None:
        raise ValueError(
            f"sampler {name!r} adds noise: pass rng=jax.random.key(seed) or noise_sampler="
        )
    positive = jnp.where(sigmas > 0, sigmas, jnp.inf)
    grid = sigmas if r is None else jnp.concatenate([sigmas, sde_midpoints(sigmas, r)])
    return brownian_noise_sampler(rng, x, jnp.min(positive), jnp.max(sigmas), grid=grid)
