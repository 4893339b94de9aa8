"""The FID Inception-v3 (pytorch-fid's ``fid_inception_v3``, the TF ``2015-12-05`` graph) in Flax.

Module and parameter names follow torchvision/pytorch-fid (``Mixed_7c.branch3x3dbl_3b.conv``)
so ``pt_inception-2015-12-05-6726825d.pth`` maps one-to-one (see ``convert_weights.py``).
Differences from torchvision's Inception3, as pytorch-fid makes them:
Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b (E_1) average pools use
``count_include_pad=False``; Mixed_7c (E_2) has a 3x3 stride-1 **max** pool branch;
every BasicConv2d is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU; fc is
2048 -> 1008. Input: NHWC float, already resized to 299 and scaled to ``(x - 128)/128``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
BN_EPS = 1e-3


def _ch(c: int, width: float) -> int:
    """Channel count c scaled by width (width 1 is the real network)."""
    return max(1, round(c * width))


class BasicConv2d(nn.Module):
    """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU, torch padding and stride."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.he_normal(),
            precision=jax.lax.Precision.HIGHEST,
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn")(x))


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed running statistics: (x - mean)/sqrt(var + eps)*scale + bias."""

    eps: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        a = scale * jax.lax.rsqrt(var + self.eps)  # [C], float32
        return (x.astype(jnp.float32) * a + (bias - mean * a)).astype(self.dtype)


def avg_pool_exclude_pad(x: Array) -> Array:
    """3x3 stride-1 pad-1 average pool with count_include_pad=False."""
    window, pad = (1, 3, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    n = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
    return s / n


def max_pool(x: Array, stride: int, pad: int = 0) -> Array:
    """3x3 max pool (torch pads with -inf)."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


class InceptionA(nn.Module):
    """FIDInceptionA: 1x1 | 5x5 | double 3x3 | avg pool (pad excluded) + 1x1."""

    pool_features: int
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda n: _ch(n, self.width)  # noqa: E731
        conv = lambda n, k, p, name: BasicConv2d(c(n), k, 1, p, self.dtype, name=name)  # noqa: E731
        b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: strided 3x3 | double 3x3 (strided) | max pool."""

    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda n: _ch(n, self.width)  # noqa: E731
        b3 = BasicConv2d(c(384), (3, 3), 2, dtype=self.dtype, name="branch3x3")(x)
        d = BasicConv2d(c(64), (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
        d = BasicConv2d(c(96), (3, 3), 1, (1, 1), self.dtype, name="branch3x3dbl_2")(d)
        d = BasicConv2d(c(96), (3, 3), 2, dtype=self.dtype, name="branch3x3dbl_3")(d)
        return jnp.concatenate([b3, d, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC: 1x1 | 7x7 factorised | double 7x7 factorised | avg pool (pad excluded)."""

    channels_7x7: int
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda n: _ch(n, self.width)  # noqa: E731
        conv = lambda n, k, p, name: BasicConv2d(c(n), k, 1, p, self.dtype, name=name)  # noqa: E731
        c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
        b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = conv(c7, *row, "branch7x7_2")(b7)
        b7 = conv(192, *col, "branch7x7_3")(b7)
        d = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        d = conv(c7, *col, "branch7x7dbl_2")(d)
        d = conv(c7, *row, "branch7x7dbl_3")(d)
        d = conv(c7, *col, "branch7x7dbl_4")(d)
        d = conv(192, *row, "branch7x7dbl_5")(d)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, d, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | max pool."""

    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda n: _ch(n, self.width)  # noqa: E731
        dt = self.dtype
        b3 = BasicConv2d(c(192), (1, 1), dtype=dt, name="branch3x3_1")(x)
        b3 = BasicConv2d(c(320), (3, 3), 2, dtype=dt, name="branch3x3_2")(b3)
        b7 = BasicConv2d(c(192), (1, 1), dtype=dt, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(c(192), (1, 7), 1, (0, 3), dt, name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(c(192), (7, 1), 1, (3, 0), dt, name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(c(192), (3, 3), 2, dtype=dt, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (avg pool, pad excluded) or E_2 (max pool): 1x1 | 3x3 split | dbl split."""

    max_pool_branch: bool
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = lambda n: _ch(n, self.width)  # noqa: E731
        conv = lambda n, k, p, name: BasicConv2d(c(n), k, 1, p, self.dtype, name=name)  # noqa: E731
        row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
        b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [conv(384, *row, "branch3x3_2a")(b3), conv(384, *col, "branch3x3_2b")(b3)], -1
        )
        d = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        d = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(d)
        d = jnp.concatenate(
            [conv(384, *row, "branch3x3dbl_3a")(d), conv(384, *col, "branch3x3dbl_3b")(d)], -1
        )
        pooled = max_pool(x, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, d, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3: x [B,299,299,3] in (x-128)/128 -> (pool3 [B,2048], logits [B,1008]).

    ``width`` scales every channel count (1.0 is the real network; smaller for tests).
    ``return_blocks`` also returns the spatial means after pytorch-fid's blocks 0, 1 and 2.
    """

    num_classes: int = 1008
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, return_blocks: bool = False):
        w, dt = self.width, self.dtype
        x = x.astype(dt)
        x = BasicConv2d(_ch(32, w), (3, 3), 2, dtype=dt, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(_ch(32, w), (3, 3), dtype=dt, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(_ch(64, w), (3, 3), 1, (1, 1), dt, name="Conv2d_2b_3x3")(x)
        x = block0 = max_pool(x, 2)
        x = BasicConv2d(_ch(80, w), (1, 1), dtype=dt, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(_ch(192, w), (3, 3), dtype=dt, name="Conv2d_4a_3x3")(x)
        x = block1 = max_pool(x, 2)
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool, w, dt, name=name)(x)
        x = InceptionB(w, dt, name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, w, dt, name=name)(x)
        block2 = x
        x = InceptionD(w, dt, name="Mixed_7a")(x)
        x = InceptionE(False, w, dt, name="Mixed_7b")(x)
        x = InceptionE(True, w, dt, name="Mixed_7c")(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B,2048] pool3
        fc = nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST, name="fc")
        logits = fc(features)  # [B,1008]
        if not return_blocks:
            return features, logits
        means = [jnp.mean(b.astype(jnp.float32), axis=(1, 2)) for b in (block0, block1, block2)]
        return features, logits, means
