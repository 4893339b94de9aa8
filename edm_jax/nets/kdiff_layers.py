"""Layers shared by k-diffusion's transformers (``image_transformer_v1`` / ``_v2``), NHWC.

Fourier features, RMSNorm / AdaRMSNorm (float32 statistics, eps 1e-6), the GEGLU
feed-forward and the mapping network, laid out so that every Flax path maps onto the
torch state_dict name (``blocks_0/up_proj/kernel`` <-> ``blocks.0.up_proj.weight``; see
``convert_kdiff.py``). Initialisation follows the reference (torch default Linear init,
zero-init of residual outputs and AdaRMSNorm linears) so that training starts as there.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def torch_linear_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), kernel [in, out]."""
    bound = 1 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def linear(
    features: int,
    *,
    zero: bool = False,
    bias: bool = False,
    name: str | None = None,
    dtype=jnp.float32,
):
    """A torch-initialised Linear (zero-initialised when `zero`), kernel [in, out] float32, computing in dtype."""
    init = nn.initializers.zeros if zero else torch_linear_init
    return nn.Dense(features, use_bias=bias, kernel_init=init, dtype=dtype, name=name)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU as torch F.gelu; the tanh approximation costs 2e-4."""
    return jax.nn.gelu(x, approximate=False)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """x * scale * rsqrt(mean(x^2) + eps), statistics in float32 (k-diffusion ``rms_norm``)."""
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), jnp.float32)
    mean_sq = jnp.mean(jnp.square(x.astype(dtype)), axis=-1, keepdims=True)
    return x * (scale.astype(dtype) * jax.lax.rsqrt(mean_sq + eps)).astype(x.dtype)


class FourierFeatures(nn.Module):
    """[cos, sin](2 pi x W^T) with a fixed N(0, std^2) buffer W [out/2, in] (k-diffusion layers.py)."""

    out_features: int
    std: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, in] -> [B, out]; the buffer is stored as leaf ``freqs`` (not trained)."""
        shape = (self.out_features // 2, x.shape[-1])
        w = self.param("freqs", nn.initializers.normal(self.std), shape, jnp.float32)
        f = 2 * math.pi * x @ w.T
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (ones), eps 1e-6."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., C] -> [..., C]."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale is 1 + cond W^T (zero-init linear), computed in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        """x [B, ..., C], cond [B, F] -> [B, ..., C]."""
        scale = linear(x.shape[-1], zero=True, name="linear")(cond) + 1  # [B, C]
        scale = scale.reshape(scale.shape[0], *(1,) * (x.ndim - 2), scale.shape[-1])
        return rms_norm(x, scale, self.eps)


def geglu_feed_forward(
    x: Array, d_model: int, d_ff: int, dropout: float, train: bool, dtype=jnp.float32
) -> Array:
    """up_proj (2 d_ff) -> a * gelu(gate) -> dropout -> down_proj (zero-init); call inside @compact."""
    a, gate = jnp.split(linear(2 * d_ff, name="up_proj", dtype=dtype)(x), 2, axis=-1)
    x = nn.Dropout(dropout, deterministic=not train)(a * gelu(gate))
    return linear(d_model, zero=True, name="down_proj", dtype=dtype)(x)


class MappingFeedForwardBlock(nn.Module):
    """RMSNorm -> GEGLU feed-forward, residual (``MappingFeedForwardBlock``)."""

    d_model: int
    d_ff: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """x [B, d_model] -> [B, d_model]."""
        h = RMSNorm(name="norm")(x)
        return x + geglu_feed_forward(h, self.d_model, self.d_ff, self.dropout, train)


class MappingNetwork(nn.Module):
    """in_norm -> n_layers residual GEGLU blocks -> out_norm (``MappingNetwork``)."""

    n_layers: int
    d_model: int
    d_ff: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """x [B, d_model] -> cond [B, d_model]."""
        x = RMSNorm(name="in_norm")(x)
        for i in range(self.n_layers):
            block = MappingFeedForwardBlock(
                self.d_model, self.d_ff, self.dropout, name=f"blocks_{i}"
            )
            x = block(x, train)
        return RMSNorm(name="out_norm")(x)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace in float32 (first half from start, second half from stop)."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = (stop32 - start32) / np.float32(num - 1) if num > 1 else np.float32(0)
    i = np.arange(num, dtype=np.float32)
    half = num // 2
    return np.where(i < half, start32 + step * i, stop32 - step * (num - 1 - i)).astype(np.float32)


def make_axial_pos(h: int, w: int, pixel_aspect_ratio: float = 1.0) -> np.ndarray:
    """Centres of linspace cells in the bounding box of the grid, float32 [h, w, 2] ([..., 0] = row).

    The longer side spans [-1, 1]; the shorter spans +-(short/long) (k-diffusion axial_rope.py).
    """
    ar = w / (h * pixel_aspect_ratio)
    y, x = (1.0, 1.0)
    if ar > 1:
        y = 1 / ar
    elif ar < 1:
        x = ar
    edges_h, edges_w = _linspace_f32(-y, y, h + 1), _linspace_f32(-x, x, w + 1)
    h_pos = (edges_h[:-1] + edges_h[1:]) / np.float32(2)
    w_pos = (edges_w[:-1] + edges_w[1:]) / np.float32(2)
    return np.stack(np.meshgrid(h_pos, w_pos, indexing="ij"), axis=-1).astype(np.float32)
