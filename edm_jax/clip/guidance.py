"""CLIP-guided sampling as k-diffusion's ``sample_clip_guided.py`` does it, for every sampler.

The guided denoiser (``clip_guided``): D = denoise(x, sigma); the image ``(D + 1) / 2`` is
shifted by a random translation (kornia ``RandomAffine(0, (1/14, 1/14), padding_mode='border')``:
bilinear, borders repeated), resized to CLIP's input with resize_right's antialiased cubic
(reflect padding; not PIL-style), CLIP-normalised and embedded; the loss is ``scale *
sum spherical_dist(l2n(embed), target)``; its gradient w.r.t. the *noisy* x (through the
denoiser) moves D by ``-grad * sigma**2``; the sampler sees ``clamp(D', -1, 1)``.

``CLIPGuidedModel`` wraps any pixel model for ``edm_jax.sample``: pass ``(params,
clip_params)``. Its translations come from the per-seed key ``sample()`` hands it (folded
with the noise level), so a seed's image does not depend on the rest of the batch.
Several weighted prompts (``"a:1|b:-0.5"``, weights normalised by |sum| as v-diffusion's
``clip_sample.py``) pull towards and away from texts; image prompts (``image_targets``) are
targets too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.clip import model as clip_model
from edm_jax.guidance import WrappedModel
from edm_jax.samplers.core import append_dims

Array = jax.Array

TRANSLATE = 1 / 14  # kornia RandomAffine translate fraction in sample_clip_guided.py
DEFAULTS: dict[str, Any] = {"sampler": "dpmpp_2s_ancestral", "num_steps": 100, "scale": 500.0}


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5 (resize_right ``cubic``)."""
    a = np.abs(x)
    return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * (
        (a > 1) & (a <= 2)
    )


def _reflect(j: np.ndarray, n: int) -> np.ndarray:
    """Reflect indices into [0, n) without repeating the edge (-1 -> 1, n -> n - 2)."""
    if n == 1:
        return np.zeros_like(j)
    period = 2 * (n - 1)
    j = np.mod(j, period)
    return np.where(j >= n, period - j, j)


@functools.cache
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of resize_right's antialiased cubic along one axis."""
    eps = np.finfo(np.float32).eps
    s = np.float32(n_out / n_in)

    def kernel(d: np.ndarray) -> np.ndarray:  # antialiasing: a stretched kernel when shrinking
        return s * _cubic(s * d) if s < 1 else _cubic(d)

    support = 4.0 / float(s) if s < 1 else 4.0
    grid = ((np.arange(n_out, dtype=np.float32) + 0.5) / s - 0.5).astype(np.float32)
    left = np.ceil(grid - support / 2 - eps)
    taps = left[:, None] + np.arange(math.ceil(support - eps))[None]
    w = kernel(grid[:, None] - taps).astype(np.float32)
    w = (w / np.where(w.sum(1, keepdims=True) == 0, 1, w.sum(1, keepdims=True))).astype(np.float32)
    out = np.zeros((n_out, n_in), np.float32)
    np.add.at(
        out,
        (np.repeat(np.arange(n_out), taps.shape[1]), _reflect(taps.astype(int), n_in).ravel()),
        w.ravel(),
    )
    return out


def resize(images: Array, size: tuple[int, int]) -> Array:
    """resize_right(images, out_shape=size, pad_mode='reflect') for NHWC images (H, then W)."""
    h, w = images.shape[1:3]
    if (h, w) == tuple(size):
        return images
    mh, mw = (jnp.asarray(resize_matrix(a, b)) for a, b in ((h, size[0]), (w, size[1])))
    y = jnp.einsum("ik,bkwc->biwc", mh, images)
    return jnp.einsum("jl,bilc->bijc", mw, y)


def _shift_matrix(n: int, shift: Array) -> Array:
    """[n, n] bilinear weights of sampling at clamp(i - shift, 0, n - 1)."""
    src = jnp.clip(jnp.arange(n, dtype=jnp.float32) - shift, 0, n - 1)
    lo = jnp.floor(src)
    frac = src - lo
    hi = jnp.minimum(lo + 1, n - 1)
    onehot = lambda i: jax.nn.one_hot(i.astype(jnp.int32), n, dtype=jnp.float32)  # noqa: E731
    return onehot(lo) * (1 - frac)[:, None] + onehot(hi) * frac[:, None]


def translate(images: Array, shifts: Array) -> Array:
    """Shift NHWC images by (tx, ty) [B, 2] pixels, bilinear with border padding (kornia)."""

    def one(img, shift):
        mx, my = _shift_matrix(img.shape[1], shift[0]), _shift_matrix(img.shape[0], shift[1])
        return jnp.einsum("ik,jl,klc->ijc", my, mx, img.astype(jnp.float32)).astype(img.dtype)

    return jax.vmap(one)(images, shifts)


def random_shifts(
    key: Array, batch: int, height: int, width: int, fraction: float = TRANSLATE
) -> Array:
    """(tx, ty) [B, 2] uniform in |t| <= fraction * size, as kornia's RandomAffine draws them."""
    bound = jnp.asarray([fraction * width, fraction * height], jnp.float32)
    return jax.random.uniform(key, (batch, 2), jnp.float32, -bound, bound)


def spherical_dist_loss(x: Array, y: Array) -> Array:
    """2 arcsin(|l2n(x) - l2n(y)| / 2)^2, broadcasting over leading axes (finite grad at 0)."""
    d = clip_model.l2_normalize(x) - clip_model.l2_normalize(y)
    sq = jnp.sum(jnp.square(d), axis=-1)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return 2 * jnp.square(jnp.arcsin(norm / 2))


def image_embed(clip_apply: Callable[[Array], Array], images01: Array, size: int) -> Array:
    """l2n(encode_image(normalize(resize(images01)))) for NHWC images in [0, 1] (one channel
    is shown to CLIP as grey RGB)."""
    if images01.shape[-1] == 1:
        images01 = jnp.repeat(images01, 3, axis=-1)
    x = clip_model.normalize_images(resize(images01, (size, size)))
    return clip_model.l2_normalize(clip_apply(x).astype(jnp.float32))


def clip_guided(
    denoise: Callable[[Array, Array], Array],
    embed: Callable[[Array], Array],
    targets: Array,
    weights: Array,
    scale: float,
    shifts: Callable[[Array, Array], Array],
) -> Callable[[Array, Array], Array]:
    """The guided denoiser ``clamp(D - sigma^2 grad_x L, -1, 1)``.

    ``embed(images01) -> [B, D]`` normalised CLIP embeddings; ``targets`` [P, D] normalised
    text (or image) embeddings with ``weights`` [P]; ``shifts(x, sigma) -> [B, 2]`` the
    translations of this call. L = scale * sum_b sum_p w_p spherical_dist(embed_b, target_p).
    """

    def guided(x: Array, sigma) -> Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), x.shape[:1])
        t = shifts(x, sigma)

        def loss(x_):
            D = denoise(x_, sigma)
            e = embed(translate((D + 1) / 2, t))
            dist = spherical_dist_loss(e[:, None], targets[None])  # [B, P]
            return scale * jnp.sum(dist * weights), D

        grad, D = jax.grad(loss, has_aux=True)(x)
        return jnp.clip(D - grad * append_dims(sigma, x.ndim) ** 2, -1, 1)

    return guided


def parse_prompts(text: str) -> list[tuple[str, float]]:
    """``"a photo:1|a sketch:-0.5"`` -> [(text, weight)] (weight 1 where none is given)."""
    out = []
    for part in text.split("|"):
        prompt, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            prompt, w = part, 1.0
        if not prompt.strip():
            raise ValueError(
                f"CLIP prompt {text!r} has an empty part; write 'text:weight|text:weight'"
            )
        out.append((prompt.strip(), w))
    total = abs(sum(w for _, w in out))
    if total == 0:
        raise ValueError(f"CLIP prompt weights of {text!r} sum to 0; they must not cancel")
    return out


def _sigma_key(key: Array, sigma: Array) -> Array:
    bits = jax.lax.bitcast_convert_type(jnp.asarray(sigma, jnp.float32).reshape(-1)[0], jnp.uint32)
    return jax.random.fold_in(key, bits)


@dataclasses.dataclass(frozen=True)
class CLIPGuidedModel(WrappedModel):
    """A pixel model sampled with CLIP guidance: pass ``(params, clip_params)`` to ``sample``.

    ``targets`` [P, D]: normalised CLIP embeddings of the prompts (``text_targets``) with
    ``weights`` [P]; ``scale``: ``--clip-guidance-scale`` (k-diffusion's default 500).
    """

    model: Any
    clip_config: clip_model.CLIPConfig
    targets: Any
    weights: tuple[float, ...]
    scale: float = 500.0
    fraction: float = TRANSLATE

    takes_key = True  # sample() passes the seed's key: the translations are per seed

    def __post_init__(self):
        if self.model.encoder is not None:
            raise ValueError("CLIP guidance needs a pixel model; this one samples latents")
        if not math.isfinite(self.scale):
            raise ValueError(f"CLIP guidance scale must be finite, got {self.scale}")
        if len(self.weights) != np.shape(self.targets)[0]:
            raise ValueError(
                f"{len(self.weights)} weights for {np.shape(self.targets)[0]} CLIP targets"
            )

    @property
    def inner(self) -> Any:
        """The guided model: geometry, labels and sigma range are its."""
        return self.model

    def denoise(self, params, x, sigma, labels=None, key=None, **kw) -> Array:
        """The CLIP-guided, clamped denoiser output for x [B, H, W, C]."""
        p_model, p_clip = params
        if key is None:
            raise ValueError("CLIP guidance draws its translations from a key: sample() passes one")
        size = self.clip_config.image_resolution
        h, w = x.shape[1:3]

        def embed(images01):
            return image_embed(
                lambda a: clip_model.encode_image(p_clip, self.clip_config, a), images01, size
            )

        def shifts(x_, sigma_):
            return random_shifts(_sigma_key(key, sigma_), x_.shape[0], h, w, self.fraction)

        def denoise(x_, s):
            return self.model.denoise(p_model, x_, s, labels=labels, **kw)

        weights = jnp.asarray(self.weights, jnp.float32)
        weights = weights / jnp.abs(jnp.sum(weights))
        return clip_guided(denoise, embed, jnp.asarray(self.targets), weights, self.scale, shifts)(
            x, sigma
        )


def text_targets(
    clip_params, config: clip_model.CLIPConfig, tokenizer, prompts: list[str]
) -> np.ndarray:
    """Normalised text embeddings [P, D] (``F.normalize(encode_text(tokenize(p)))``)."""
    tokens = jnp.asarray(tokenizer(prompts, config.context_length))
    return np.asarray(clip_model.l2_normalize(clip_model.encode_text(clip_params, config, tokens)))


def load_image01(path) -> np.ndarray:
    """An image file as float32 RGB in [0, 1], [1, H, W, 3] (PIL ``convert('RGB')``)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as img:
            return (np.asarray(img.convert("RGB"), np.float32) / 255.0)[None]
    except PIL.UnidentifiedImageError:
        raise ValueError(f"CLIP image prompt {str(path)!r} is not an image PIL can read") from None


def image_targets(clip_params, config: clip_model.CLIPConfig, images01: list) -> np.ndarray:
    """Normalised image embeddings [P, D] of image prompts (each [1, H, W, C] in [0, 1]),
    as v-diffusion's ``clip_sample.py`` image prompts but the whole image resized to CLIP's
    input (the guidance's resize; no cutouts)."""

    def one(img):
        return image_embed(
            lambda a: clip_model.encode_image(clip_params, config, a),
            jnp.asarray(img),
            config.image_resolution,
        )[0]

    return np.stack([np.asarray(one(img)) for img in images01])
