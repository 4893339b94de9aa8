"""CLIP features for evaluation (k-diffusion ``evaluation.CLIPFeatureExtractor``) and CLIP score.

Features: images in [-1, 1] -> [0, 1] -> bicubic antialiased resize to CLIP's input (PIL-style,
``F.interpolate(..., 'bicubic', antialias=True)`` = ``jax.image.resize(..., 'cubic')``; not the
guidance's resize_right) -> CLIP normalisation -> ``l2n(encode_image) * sqrt(embed_dim)``.
CLIP score: the cosine of image and text embeddings (times 100, clipped at 0, as torchmetrics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.clip import model as clip_model

Array = jax.Array


def eval_resize(images: Array, size: int) -> Array:
    """[-1, 1] NHWC -> [0, 1] at size x size, bicubic with antialiasing."""
    u = (images.astype(jnp.float32) + 1) / 2
    if u.shape[1:3] == (size, size):
        return u
    return jax.image.resize(u, (u.shape[0], size, size, u.shape[3]), "cubic", antialias=True)


def clip_features(params, config: clip_model.CLIPConfig, images: Array) -> np.ndarray:
    """k-diffusion's CLIP features [N, embed_dim] of NHWC images in [-1, 1]."""
    return np.asarray(feature_fn(config)(params, jnp.asarray(images)))


def feature_fn(config: clip_model.CLIPConfig):
    """Jitted (params, NHWC images in [-1, 1]) -> features [N, embed_dim]."""

    @jax.jit
    def run(params, images):
        x = clip_model.normalize_images(eval_resize(images, config.image_resolution))
        emb = clip_model.encode_image(params, config, x)
        return clip_model.l2_normalize(emb) * math.sqrt(config.embed_dim)

    return run


def clip_score(params, config: clip_model.CLIPConfig, images: Array, tokens: Array) -> np.ndarray:
    """100 * max(cos(image, text), 0) per pair [N] (images [-1, 1] NHWC, tokens [N, 77])."""
    img = clip_features(params, config, images) / math.sqrt(config.embed_dim)
    txt = clip_model.l2_normalize(clip_model.encode_text(params, config, jnp.asarray(tokens)))
    return np.maximum(100 * np.sum(img * np.asarray(txt, np.float32), axis=-1), 0)
