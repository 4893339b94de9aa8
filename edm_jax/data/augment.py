"""EDM's non-leaking augmentation pipeline (Karras et al. 2022, Appendix F.2), in JAX.

Same transforms, probabilities and 9-dim augment-label layout as NVlabs/edm
``training/augment.py`` (itself from StyleGAN2-ADA, Karras et al. 2020): pixel
blitting (x/y flips, integer rotation, integer translation) followed by one geometric
warp (isotropic scaling, rotation, anisotropic scaling, fractional translation) done
on a 2x upsampled, reflect-padded image with the ``sym6`` wavelet filter. Labels are
appended in that order for every transform whose multiplier is > 0, so the default
CIFAR-10 setting gives ``[xflip, yflip, scale, cos(rot)-1, sin(rot), aniso_c,
aniso_s, tx, ty]``. Colour transforms are not implemented (EDM does not use them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.data.warp import geometric_warp, rotate2d, scale2d, translate2d

__all__ = ["augment", "augment_dim", "hflip"]

_LABEL_WIDTH = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1}
_LABEL_WIDTH |= {"rotate_frac": 2, "aniso": 2, "translate_frac": 2}
_EDM_DEFAULTS = dict(xflip=1e8, yflip=1, rotate_int=0, translate_int=0)
_EDM_DEFAULTS |= dict(scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def augment_dim(**multipliers: float) -> int:
    """Width of the augment labels for the given transform multipliers (9 for EDM's)."""
    cfg = {**_EDM_DEFAULTS, **multipliers}
    return sum(w for name, w in _LABEL_WIDTH.items() if float(cfg[name]) > 0)


def hflip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image left-right with probability 1/2. images: [B,H,W,C]."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def _gate(rng: jax.Array, value: jax.Array, prob) -> jax.Array:
    """Keep `value` where a uniform draw < prob, else 0 (the reference's torch.where)."""
    keep = jax.random.uniform(rng, value.shape[-1:]) < prob
    return jnp.where(keep, value, jnp.zeros_like(value))


def _blit_flip(rng, images, prob, axis):
    """Flip along `axis` (2 = x, 1 = y) for a random half of the gated samples."""
    k_w, k_p = jax.random.split(rng)
    w = _gate(k_p, jax.random.randint(k_w, (images.shape[0],), 0, 2), prob)  # [B]
    out = jnp.where(w[:, None, None, None] == 1, jnp.flip(images, axis), images)
    return out, [w]


def _blit_rotate_int(rng, images, prob):
    """Rotate by a random multiple of 90 degrees (flips + transpose, as the reference)."""
    k_w, k_p = jax.random.split(rng)
    w = _gate(k_p, jax.random.randint(k_w, (images.shape[0],), 0, 4), prob)[:, None, None, None]
    images = jnp.where((w == 1) | (w == 2), images[:, :, ::-1], images)
    images = jnp.where((w == 2) | (w == 3), images[:, ::-1], images)
    images = jnp.where((w == 1) | (w == 3), jnp.swapaxes(images, 1, 2), images)
    w = w[:, 0, 0, 0]
    return images, [(w == 1) | (w == 2), (w == 2) | (w == 3)]


def translate_int_pixels(images: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
    """Shift image b by (tx[b], ty[b]) integer pixels (content moves right/up), reflecting."""
    _, H, W, _ = images.shape
    x = jnp.arange(W)[None, :] - tx[:, None]  # [B,W] source columns
    y = jnp.arange(H)[None, :] + ty[:, None]  # [B,H] source rows
    x = W - 1 - jnp.abs(W - 1 - jnp.mod(x, 2 * W - 2))
    y = H - 1 - jnp.abs(H - 1 - jnp.mod(y, 2 * H - 2))
    images = jnp.take_along_axis(images, y[:, :, None, None], axis=1)
    return jnp.take_along_axis(images, x[:, None, :, None], axis=2)


def _blit_translate_int(rng, images, prob, max_frac):
    """Integer translation by up to max_frac of the image size, with reflection."""
    _, H, W, _ = images.shape
    k_w, k_p = jax.random.split(rng)
    w = jax.random.uniform(k_w, (2, images.shape[0])) * 2 - 1
    w = _gate(k_p, w, prob)
    tx = jnp.round(w[0] * (W * max_frac)).astype(jnp.int32)
    ty = jnp.round(w[1] * (H * max_frac)).astype(jnp.int32)
    images = translate_int_pixels(images, tx, ty)
    return images, [tx / (W * max_frac), ty / (H * max_frac)]


def _geometry(rng, B, H, W, prob, on, o):
    """Random inverse warp G_inv [B,3,3] and its labels (reference's parameter selection)."""
    keys = iter(jax.random.split(rng, 10))
    G_inv, labels = jnp.broadcast_to(jnp.eye(3), (B, 3, 3)), []
    if on["scale"]:
        w = _gate(next(keys), jax.random.normal(next(keys), (B,)), on["scale"] * prob)
        s = jnp.exp2(w * o["scale_std"])
        G_inv, labels = G_inv @ scale2d(1 / s, 1 / s), labels + [w]
    if on["rotate_frac"]:
        w = (jax.random.uniform(next(keys), (B,)) * 2 - 1) * (np.pi * o["rotate_frac_max"])
        w = _gate(next(keys), w, on["rotate_frac"] * prob)
        G_inv, labels = G_inv @ rotate2d(w), labels + [jnp.cos(w) - 1, jnp.sin(w)]
    if on["aniso"]:
        w = jax.random.normal(next(keys), (B,))  # draws in the reference's order
        r = (jax.random.uniform(next(keys), (B,)) * 2 - 1) * np.pi
        w = _gate(next(keys), w, on["aniso"] * prob)
        r = jnp.where(jax.random.uniform(next(keys), (B,)) < o["aniso_rotate_prob"], r, 0.0)
        r = jnp.where(w == 0, 0.0, r)  # labels unchanged; keeps G_inv exactly I when off
        s = jnp.exp2(w * o["aniso_std"])
        G_inv = G_inv @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
        labels += [w * jnp.cos(r), w * jnp.sin(r)]
    if on["translate_frac"]:
        w = _gate(next(keys), jax.random.normal(next(keys), (2, B)), on["translate_frac"] * prob)
        std = o["translate_frac_std"]
        G_inv = G_inv @ translate2d(-w[0] * (W * std), -w[1] * (H * std))
        labels += [w[0], w[1]]
    return G_inv, labels


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    p: float | jax.Array,
    xflip: float = 1e8,
    yflip: float = 1,
    rotate_int: float = 0,
    translate_int: float = 0,
    translate_int_max: float = 0.125,
    scale: float = 1,
    rotate_frac: float = 1,
    aniso: float = 1,
    translate_frac: float = 1,
    scale_std: float = 0.2,
    rotate_frac_max: float = 1,
    aniso_std: float = 0.2,
    aniso_rotate_prob: float = 0.5,
    translate_frac_std: float = 0.125,
) -> tuple[jax.Array, jax.Array]:
    """EDM augmentation of images [B,H,W,C] in [-1,1] -> (images, augment_labels [B,D]).

    Each transform is applied to a sample with probability ``multiplier * p``
    (``xflip=1e8`` makes x-flips always eligible, i.e. a flip with probability 1/2).
    Multipliers are static Python floats (they fix the label layout); ``p`` may be traced.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B,H,W,C], got shape {images.shape}")
    B, H, W, _ = images.shape
    k_x, k_y, k_r, k_t, k_g = jax.random.split(rng, 5)
    labels = []
    if xflip > 0:
        images, lab = _blit_flip(k_x, images, xflip * p, axis=2)
        labels += lab
    if yflip > 0:
        images, lab = _blit_flip(k_y, images, yflip * p, axis=1)
        labels += lab
    if rotate_int > 0:
        images, lab = _blit_rotate_int(k_r, images, rotate_int * p)
        labels += lab
    if translate_int > 0:
        images, lab = _blit_translate_int(k_t, images, translate_int * p, translate_int_max)
        labels += lab
    on = dict(scale=scale, rotate_frac=rotate_frac, aniso=aniso, translate_frac=translate_frac)
    on = {k: float(v) if float(v) > 0 else 0.0 for k, v in on.items()}
    opts = dict(scale_std=scale_std, rotate_frac_max=rotate_frac_max, aniso_std=aniso_std)
    opts |= dict(aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
    if any(on.values()):
        G_inv, lab = _geometry(k_g, B, H, W, p, on, opts)
        images = geometric_warp(images, G_inv)
        labels += lab
    if not labels:
        return images, jnp.zeros((B, 0), jnp.float32)
    return images, jnp.stack([jnp.asarray(x, jnp.float32).reshape(B) for x in labels], axis=1)
