"""Counter-based random bits from an integer hash: the one home of the cheap generator.

`jax.random` (threefry) costs ~20 rounds of 32-bit arithmetic per value, a large share of a
CPU train step's dropout and of the samplers' Brownian noise. Here a value is a hash of
(seed, counter): a few multiply/xor-shifts, any element addressable on its own. Seeds come
from a `jax.random` key, so streams stay keyed by the caller's RNG as everywhere else.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

_MIX = (0x7FEB352D, 0x846CA68B)  # lowbias32 multipliers (C. Wellons' integer hash)


def mix32(h: Array) -> Array:
    """A bijective 32-bit integer hash (lowbias32) of uint32 h."""
    h = (h ^ (h >> 16)) * jnp.uint32(_MIX[0])
    h = (h ^ (h >> 15)) * jnp.uint32(_MIX[1])
    return h ^ (h >> 16)


def seed_words(key: Array) -> Array:
    """uint32[2] seed words of a jax.random key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def bits(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 random bits of `shape`, element i = hash(seed, i) (row-major counter)."""
    seed = seed_words(key)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape))
    return mix32(mix32(counter ^ seed[0]) + seed[1]).reshape(shape)


def dropout(key: Array, x: Array, rate: float) -> Array:
    """Inverted dropout: each element zeroed with probability `rate`, the rest / (1 - rate)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
    if rate == 0.0:
        return x
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    keep = bits(key, x.shape) >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros([], x.dtype))
