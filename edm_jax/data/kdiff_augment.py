"""k-diffusion's ``KarrasAugmentationPipeline`` in JAX, on the batch inside the train step.

Per image it draws, as ``k_diffusion/augmentation.py``: a0 an x-flip (always random), a1 a
y-flip, a2 an isotropic log-scale, a3 a rotation, a4/a5 an anisotropic scaling along a random
angle and a6/a7 a translation, each of a1..a7 applied with probability ``a_prob``; composes
their 3x3 matrix about the image centre (with the reference's ``h, w = image.size`` naming:
h is the width, w the height) and warps the image by it as ``skimage.transform.warp(image,
tf.inverse, order=3, mode='reflect')`` does: each output pixel (row r, col c) samples the
input at inv(M) [c, r, 1] with skimage's bicubic (Catmull-Rom) kernel and mirror borders.
The conditioning vector is [a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7].
k-diffusion's train.py passes ``disable_all=augment_prob == 0``: the step then leaves the
images alone with a zero vector (``train/step.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["augment_matrix", "aug_cond", "draw_params", "karras_augment", "warp"]


def draw_params(rng: Array, batch: int, a_prob: float) -> dict[str, Array]:
    """The draws a0..a7 [B] of the reference pipeline (a1..a7 zero unless their rand < a_prob)."""
    if not 0.0 <= a_prob <= 1.0:
        raise ValueError(f"augment_prob must be in [0, 1], got {a_prob!r}")
    k_flip, k_do, k_u, k_n = jax.random.split(rng, 4)
    do = (jax.random.uniform(k_do, (5, batch)) < a_prob).astype(jnp.float32)
    u = jax.random.uniform(k_u, (2, batch))
    n = jax.random.normal(k_n, (4, batch))
    flips = jax.random.bernoulli(k_flip, 0.5, (2, batch)).astype(jnp.float32)
    angle = lambda v: v * 2 * math.pi - math.pi  # noqa: E731
    return {
        "a0": flips[0], "a1": flips[1] * do[0], "a2": n[0] * do[1], "a3": angle(u[0]) * do[2],
        "a4": angle(u[1]) * do[3], "a5": n[1] * do[3], "a6": n[2] * do[4], "a7": n[3] * do[4],
    }  # fmt: skip


def _translate(tx, ty):
    one, zero = jnp.ones_like(tx), jnp.zeros_like(tx)
    return jnp.stack([jnp.stack([one, zero, tx], -1), jnp.stack([zero, one, ty], -1),
                      jnp.stack([zero, zero, one], -1)], -2)  # fmt: skip


def _scale(sx, sy):
    one, zero = jnp.ones_like(sx), jnp.zeros_like(sx)
    return jnp.stack([jnp.stack([sx, zero, zero], -1), jnp.stack([zero, sy, zero], -1),
                      jnp.stack([zero, zero, one], -1)], -2)  # fmt: skip


def _rotate(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    return jnp.stack([jnp.stack([c, -s, zero], -1), jnp.stack([s, c, zero], -1),
                      jnp.stack([zero, zero, one], -1)], -2)  # fmt: skip


def augment_matrix(p: dict[str, Array], height: int, width: int, a_scale: float = 2**0.2,
                   a_aniso: float = 2**0.2, a_trans: float = 1 / 8) -> Array:  # fmt: skip
    """[B, 3, 3]: the reference's product of translate / flip / scale / rotate matrices."""
    h, w = float(width), float(height)  # the reference's `h, w = image.size` (PIL: width, height)
    zero = jnp.zeros_like(p["a0"])
    mats = [
        _translate(zero + h / 2 - 0.5, zero + w / 2 - 0.5),
        _scale(1 - 2 * p["a0"], zero + 1),
        _scale(zero + 1, 1 - 2 * p["a1"]),
        _scale(a_scale ** p["a2"], a_scale ** p["a2"]),
        _rotate(-p["a3"]),
        _rotate(p["a4"]),
        _scale(a_aniso ** p["a5"], a_aniso ** -p["a5"]),
        _rotate(-p["a4"]),
        _translate(a_trans * w * p["a6"], a_trans * h * p["a7"]),
        _translate(zero - h / 2 + 0.5, zero - w / 2 + 0.5),
    ]
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


def aug_cond(p: dict[str, Array]) -> Array:
    """[B, 9] = [a0, a1, a2, cos a3 - 1, sin a3, a5 cos a4, a5 sin a4, a6, a7]."""
    return jnp.stack([p["a0"], p["a1"], p["a2"], jnp.cos(p["a3"]) - 1, jnp.sin(p["a3"]),
                      p["a5"] * jnp.cos(p["a4"]), p["a5"] * jnp.sin(p["a4"]), p["a6"], p["a7"]],
                     -1)  # fmt: skip


def _mirror(i: Array, n: int) -> Array:
    """skimage's 'reflect' border (numpy.pad 'reflect'): ... 2 1 | 0 1 .. n-1 | n-2 ..."""
    if n == 1:
        return jnp.zeros_like(i)
    m = jnp.mod(i, 2 * (n - 1))
    return jnp.where(m < n, m, 2 * (n - 1) - m)


def _cubic_weights(t: Array) -> Array:
    """[..., 4] Catmull-Rom weights of the samples at -1, 0, 1, 2 for the offset t in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return jnp.stack([0.5 * (-t + 2 * t2 - t3), 1 - 2.5 * t2 + 1.5 * t3,
                      0.5 * (t + 4 * t2 - 3 * t3), 0.5 * (t3 - t2)], -1)  # fmt: skip


def _warp_one(image: Array, inv: Array) -> Array:
    """One [H, W, C] image sampled at inv [c, r, 1] of each output pixel (bicubic, mirror)."""
    H, W = image.shape[:2]
    r, c = jnp.meshgrid(jnp.arange(H, dtype=jnp.float32), jnp.arange(W, dtype=jnp.float32),
                        indexing="ij")  # fmt: skip
    z = inv[2, 0] * c + inv[2, 1] * r + inv[2, 2]
    src_c = (inv[0, 0] * c + inv[0, 1] * r + inv[0, 2]) / z
    src_r = (inv[1, 0] * c + inv[1, 1] * r + inv[1, 2]) / z
    r0, c0 = jnp.floor(src_r), jnp.floor(src_c)
    wr, wc = _cubic_weights(src_r - r0), _cubic_weights(src_c - c0)  # [H, W, 4]
    offsets = jnp.arange(-1, 3)
    rows = _mirror(r0.astype(jnp.int32)[..., None] + offsets, H)  # [H, W, 4]
    cols = _mirror(c0.astype(jnp.int32)[..., None] + offsets, W)
    patch = image[rows[..., :, None], cols[..., None, :]]  # [H, W, 4, 4, C]
    return jnp.einsum("hwi,hwj,hwijc->hwc", wr, wc, patch)


def warp(images: Array, mats: Array) -> Array:
    """[B, H, W, C] images warped by the [B, 3, 3] matrices as skimage.transform.warp(image,
    AffineTransform(mat).inverse, order=3, mode='reflect')."""
    return jax.vmap(_warp_one)(images, jnp.linalg.inv(mats))


def karras_augment(rng: Array, images: Array, a_prob: float = 0.12, a_scale: float = 2**0.2,
                   a_aniso: float = 2**0.2, a_trans: float = 1 / 8) -> tuple[Array, Array]:  # fmt: skip
    """(augmented [B, H, W, C], aug_cond [B, 9]) of KarrasAugmentationPipeline(a_prob)."""
    B, H, W = images.shape[:3]
    p = draw_params(rng, B, a_prob)
    mats = augment_matrix(p, H, W, a_scale, a_aniso, a_trans)
    out = warp(images.astype(jnp.float32), mats).astype(images.dtype)
    return out, aug_cond(p).astype(images.dtype)
