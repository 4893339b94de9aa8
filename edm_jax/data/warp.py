"""Geometric warp of EDM's augmentation: 2D affine matrices and an alias-free resampler.

The warp follows NVlabs/edm ``training/augment.py``: reflect-pad, upsample 2x with the
``sym6`` wavelet low-pass filter, bilinear-sample the inverse transform ``G_inv``
(output pixel -> input pixel, centred coordinates), filter and downsample 2x. The pad
is the reference's upper bound (image size - 1 on every side) so shapes are static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["geometric_warp", "rotate2d", "scale2d", "translate2d"]

# Daubechies symlet-6 low-pass decomposition filter (the reference's wavelets['sym6']).
SYM6 = np.array(
    [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
     0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
     -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148],
    dtype=np.float32,
)  # fmt: skip
HZ_PAD = len(SYM6) // 4


def _matrix(*rows) -> jax.Array:
    """Stack rows of scalars/[B] arrays into [B,3,3] (or [3,3] when all are scalars)."""
    elems = [jnp.asarray(x, jnp.float32) for row in rows for x in row]
    shape = jnp.broadcast_shapes(*(e.shape for e in elems))
    elems = [jnp.broadcast_to(e, shape) for e in elems]
    return jnp.stack(elems, axis=-1).reshape(shape + (len(rows), len(rows[0])))


def translate2d(tx, ty) -> jax.Array:
    """Homogeneous 2D translation by (tx, ty)."""
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1])


def scale2d(sx, sy) -> jax.Array:
    """Homogeneous 2D scaling by (sx, sy)."""
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1])


def rotate2d(theta) -> jax.Array:
    """Homogeneous 2D rotation by theta radians."""
    c, s = jnp.cos(theta), jnp.sin(theta)
    return _matrix([c, -s, 0], [s, c, 0], [0, 0, 1])


def _correlate(x: jax.Array, taps: np.ndarray, axis: int, stride: int = 1) -> jax.Array:
    """Valid 1D correlation of x with taps along `axis`, with output stride (shifted sums)."""
    n_out = (x.shape[axis] - len(taps)) // stride + 1
    out: jax.Array | float = 0.0
    for k, t in enumerate(taps):
        window = lax.slice_in_dim(x, k, k + stride * (n_out - 1) + 1, stride, axis)
        out = out + float(t) * window
    return jnp.asarray(out)


def _zero_pad(x: jax.Array, axis: int, before: int, after: int) -> jax.Array:
    """Pad `axis` of x with zeros."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths)


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """Zero-insertion 2x upsampling + sym6 filter along axis, as polyphase sums (len 2L)."""
    taps = SYM6[::-1]  # the reference convolves with the flipped filter
    half = len(SYM6) // 4
    xp = _zero_pad(x, axis, half, half)
    L = x.shape[axis]
    even = _correlate(lax.slice_in_dim(xp, 0, L + 2 * half - 1, 1, axis), taps[0::2], axis)
    odd = _correlate(lax.slice_in_dim(xp, 1, L + 2 * half, 1, axis), taps[1::2], axis)
    y = jnp.stack([even, odd], axis=axis + 1)
    return y.reshape(x.shape[:axis] + (2 * L,) + x.shape[axis + 1 :])


def _upsample2x(images: jax.Array) -> jax.Array:
    """Upsample NHWC images 2x with the sym6 low-pass filter: [N,2H,2W,C]."""
    return _upsample_axis(_upsample_axis(images, 2), 1)


def _downsample2x(images: jax.Array) -> jax.Array:
    """sym6 filter then stride-2 decimation, cropping HZ_PAD pixels per side."""
    pad = (len(SYM6) - 1) // 2
    for axis in (2, 1):
        x = _correlate(_zero_pad(images, axis, pad, pad), SYM6, axis, stride=2)
        images = lax.slice_in_dim(x, HZ_PAD, x.shape[axis] - HZ_PAD, 1, axis)
    return images


def _bilinear(images: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
    """Sample images [N,H,W,C] at pixel coords ix, iy [N,h,w]; zeros outside (grid_sample)."""
    N, H, W, C = images.shape
    flat = images.reshape(N, H * W, C)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    out = jnp.zeros(ix.shape + (C,), images.dtype)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        x, y = x0 + dx, y0 + dy
        weight = (1 - jnp.abs(ix - x)) * (1 - jnp.abs(iy - y))  # [N,h,w]
        valid = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
        idx = (jnp.clip(y, 0, H - 1) * W + jnp.clip(x, 0, W - 1)).astype(jnp.int32)
        vals = jnp.take_along_axis(flat, idx.reshape(N, -1, 1), axis=1).reshape(out.shape)
        out = out + vals * jnp.where(valid, weight, 0.0)[..., None]
    return out


def _sample_grid(G_inv: jax.Array, in_hw, out_hw) -> tuple[jax.Array, jax.Array]:
    """Input pixel coords [N,h,w] of every output pixel (affine_grid + grid_sample maths)."""
    (Hi, Wi), (Ho, Wo) = in_hw, out_hw
    theta = scale2d(2 / Wi, 2 / Hi) @ G_inv @ scale2d(Wo / 2, Ho / 2)  # normalised coords
    xn = (2 * jnp.arange(Wo) + 1) / Wo - 1
    yn = (2 * jnp.arange(Ho) + 1) / Ho - 1
    grid = jnp.stack(jnp.broadcast_arrays(xn[None, :], yn[:, None], 1.0), -1)  # [h,w,3]
    g = jnp.einsum("nij,hwj->nhwi", theta[:, :2, :], grid, precision=lax.Precision.HIGHEST)
    return ((g[..., 0] + 1) * Wi - 1) / 2, ((g[..., 1] + 1) * Hi - 1) / 2


def geometric_warp(images: jax.Array, G_inv: jax.Array) -> jax.Array:
    """Warp images [N,H,W,C] by per-sample inverse transforms G_inv [N,3,3].

    Samples whose G_inv is exactly the identity are returned bit-for-bit unchanged.
    """
    N, H, W, _ = images.shape
    identity = jnp.all(G_inv == jnp.eye(3), axis=(1, 2))  # [N]
    mx, my = W - 1, H - 1  # the reference's largest margin
    x = jnp.pad(images, ((0, 0), (my, my), (mx, mx), (0, 0)), mode="reflect")
    x = _upsample2x(x)
    G = scale2d(2, 2) @ G_inv @ scale2d(0.5, 0.5)  # into upsampled pixel units
    G = translate2d(-0.5, -0.5) @ G @ translate2d(0.5, 0.5)
    out_hw = ((H + HZ_PAD * 2) * 2, (W + HZ_PAD * 2) * 2)
    ix, iy = _sample_grid(G, x.shape[1:3], out_hw)
    x = _downsample2x(_bilinear(x, ix, iy))
    return jnp.where(identity[:, None, None, None], images, x.astype(images.dtype))
