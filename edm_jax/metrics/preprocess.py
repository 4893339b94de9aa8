"""Detector input pipelines: quantisation, NVIDIA's Inception resize, edm2's DINOv2 resize.

Images are NHWC (``[B,H,W,C]``, C in {1, 3}); an NCHW array is accepted when its last axis
cannot be a channel axis. uint8 images are used as they are; float images are taken to be in
[-1, 1] and quantised exactly as NVlabs/edm ``generate.py`` saves them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INCEPTION_SIZE = 299
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HIGHEST = jax.lax.Precision.HIGHEST


def quantize(x: Array) -> Array:
    """Float images in [-1, 1] -> uint8 as NVlabs/edm: ``(x*127.5 + 128).clip(0, 255)``, truncated."""
    return jnp.clip(x.astype(jnp.float32) * 127.5 + 128, 0, 255).astype(jnp.uint8)


def to_nhwc_uint8(images: Array) -> Array:
    """Check shape/dtype, move NCHW to NHWC, quantise floats, repeat grayscale to RGB."""
    if images.ndim != 4:
        raise ValueError(
            f"images must be 4-D [B,H,W,C] (NHWC, C in 1 or 3); got shape {tuple(images.shape)}"
        )
    if images.shape[-1] not in (1, 3):
        if images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be [B,H,W,C] (NHWC) or [B,C,H,W] with C in (1, 3); "
                f"got shape {tuple(images.shape)}"
            )
        images = jnp.transpose(images, (0, 2, 3, 1))
    if images.dtype == jnp.uint8:
        x = images
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = quantize(images)
    else:
        raise ValueError(
            f"images must be uint8 in [0, 255] or float in [-1, 1]; got dtype {images.dtype}"
        )
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


def nvidia_bilinear_matrix(n_in: int, n_out: int = INCEPTION_SIZE) -> np.ndarray:
    """[n_out, n_in] float64 weights of TF1 ``resize_bilinear(align_corners=False)``.

    Output pixel i samples input position s = i*n_in/n_out with neighbours lo = floor(s),
    hi = min(lo + 1, n_in - 1): what the detector's affine_grid + grid_sample compute.
    """
    s = np.arange(n_out, dtype=np.float64) * n_in / n_out
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    f = s - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1 - f)
    np.add.at(m, (np.arange(n_out), hi), f)
    return m


def resize_separable(x: Array, my: np.ndarray, mx: np.ndarray) -> Array:
    """Apply row weights my [Ho,H] and column weights mx [Wo,W] to x [B,H,W,C]."""
    my_ = jnp.asarray(my, x.dtype)
    mx_ = jnp.asarray(mx, x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", my_, x, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", mx_, x, precision=_HIGHEST)


def nvidia_resize(x: Array, size: int = INCEPTION_SIZE) -> Array:
    """NVIDIA's Inception detector resize of float x [B,H,W,C] to [B,size,size,C]."""
    H, W = x.shape[1], x.shape[2]
    return resize_separable(x, nvidia_bilinear_matrix(H, size), nvidia_bilinear_matrix(W, size))


def inception_input(images: Array, size: int = INCEPTION_SIZE) -> Array:
    """uint8/float images -> the Inception input: resize to 299 (NVIDIA), then (x - 128)/128."""
    x = to_nhwc_uint8(images).astype(jnp.float32)
    return (nvidia_resize(x, size) - 128) / 128


def dinov2_input(images: Array, size: int = DINOV2_SIZE) -> Array:
    """uint8/float images -> edm2's DINOv2 input: antialiased bicubic to 224, /255, ImageNet norm.

    ``jax.image.resize(..., 'cubic', antialias=True)`` equals torch's
    ``F.interpolate(bicubic, antialias=True)`` (PIL-style, a=-0.5); no clamping, as edm2.
    """
    x = to_nhwc_uint8(images).astype(jnp.float32)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "cubic", antialias=True)
    x = x / 255
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def _torch_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Torch's bicubic convolution weights for the 4 taps at distances 1+t, t, 1-t, 2-t."""

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(n_in: int, scale: float) -> np.ndarray:
    """[n_out, n_in] weights of torch ``F.interpolate(bicubic, antialias=False, scale_factor)``.

    n_out = floor(n_in*scale); source s = (i + 0.5)/scale - 0.5; taps floor(s)-1..floor(s)+2
    with a = -0.75, indices clamped to the edge (what DINOv2's pos_embed interpolation does).
    """
    n_out = int(math.floor(n_in * scale))
    s = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    lo = np.floor(s).astype(np.int64)
    w = _torch_cubic(s - lo)
    m = np.zeros((n_out, n_in), np.float64)
    for k in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(lo - 1 + k, 0, n_in - 1)), w[:, k])
    return m
