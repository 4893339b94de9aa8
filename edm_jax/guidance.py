"""Guidance as denoiser transforms: each returns a ``denoise(x, sigma)`` the samplers take.

- ``cfg``: classifier-free guidance (Ho & Salimans 2022), conditional and unconditional
  evaluated in one batched call of the network.
- ``autoguidance``: guide a model with a weaker version of itself (Karras et al. 2024,
  "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2).
- ``gradient_guidance``: add the gradient of any differentiable log-probability of the
  denoised image (classifier guidance, CLIP-style losses) to the score.
- ``classifier_guidance`` / ``ClassifierGuidedModel``: guided-diffusion's classifier
  guidance, the gradient of log p(y | x_t) of a noisy-image classifier, in k-diffusion form.

All three use the EDM2 convention D_w = D_0 + w (D_1 - D_0): scale 1 gives the
conditional / main model, scale 0 the unconditional / guiding one.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from edm_jax.samplers.core import append_dims

Array = jax.Array
Denoiser = Callable[..., Array]

__all__ = [
    "ClassifierGuidedModel", "GuidedModel", "WrappedModel", "autoguidance", "cfg", "cfg_guide", "check_guide",
    "classifier_guidance", "classifier_log_prob", "gradient_guidance", "vp_c_in",
]  # fmt: skip


def _sigma_b(sigma, x: Array) -> Array:
    """sigma broadcast to [B]."""
    return jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])


def _check_scale(scale) -> None:
    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale!r}")


def cfg(
    denoise: Denoiser,
    scale,
    labels: Array,
    uncond_labels: Array | None = None,
    *,
    batched: bool = True,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Classifier-free guidance: D = D(x; sigma, uncond) + scale (D(x; sigma, labels) - D_uncond).

    With ``batched`` (default) ``denoise(x, sigma, labels=...)`` is called once on the batch
    doubled: the first half with ``labels`` [B, ...], the second with ``uncond_labels``
    (default zeros: the null label of NVlabs/edm, where a zero one-hot == ``labels=None``).
    ``batched=False`` makes two calls, the unconditional one with ``labels=None`` (for
    models with a learned null embedding). ``interval`` = (sigma_lo, sigma_hi): guide only
    there (Kynkaanniemi et al. 2024), D = D_cond elsewhere.
    """
    _check_scale(scale)
    lo, hi = _check_interval(interval)
    labels = jnp.asarray(labels)
    null = jnp.zeros_like(labels) if uncond_labels is None else jnp.asarray(uncond_labels)
    if null.shape != labels.shape:
        raise ValueError(f"uncond_labels shape {null.shape} != labels shape {labels.shape}")
    both = jnp.concatenate([labels, null], axis=0)  # [2B, ...]

    def guided(x: Array, sigma) -> Array:
        sigma = _sigma_b(sigma, x)
        if batched:
            D = denoise(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), labels=both)
            D_cond, D_uncond = jnp.split(D, 2, axis=0)
        else:
            D_cond, D_uncond = denoise(x, sigma, labels=labels), denoise(x, sigma, labels=None)
        on = append_dims((sigma >= lo) & (sigma <= hi), x.ndim)  # guidance interval
        return jnp.where(on, D_uncond + scale * (D_cond - D_uncond), D_cond)

    return guided


def autoguidance(
    denoise_main: Denoiser,
    denoise_guide: Denoiser,
    scale,
    *,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Autoguidance (EDM2, eq. 2): D = D_guide + scale (D_main - D_guide) = gnet.lerp(net, scale).

    ``denoise_guide`` is a weaker model (smaller, or trained for less), e.g.
    ``functools.partial(model.denoise, weak_params)``; both are ``denoise(x, sigma)``. With an
    unconditional guide network this is EDM2's classifier-free guidance (``cfg_guide``). The
    guide is not evaluated at scale 1 (nor outside ``interval`` = (sigma_lo, sigma_hi), the
    guidance interval of Kynkaanniemi et al. 2024, where D = D_main).
    """
    _check_scale(scale)
    lo, hi = _check_interval(interval)
    if isinstance(scale, (int, float)) and scale == 1:
        return denoise_main

    def guided(x: Array, sigma) -> Array:
        D_main = denoise_main(x, sigma)
        s_b = _sigma_b(sigma, x)
        on = (s_b >= lo) & (s_b <= hi) & (jnp.asarray(scale) != 1)  # [B]
        D_guide = jax.lax.cond(
            jnp.any(on), lambda: denoise_guide(x, sigma).astype(D_main.dtype), lambda: D_main
        )
        return jnp.where(append_dims(on, x.ndim), _lerp(D_guide, D_main, scale), D_main)

    return guided


def _lerp(start: Array, end: Array, w) -> Array:
    """torch.lerp(start, end, w): start + w (end - start), from the nearer end as torch does."""
    w = jnp.asarray(w, start.dtype)
    diff = end - start
    return jnp.where(w < 0.5, start + w * diff, end - diff * (1 - w))


def cfg_guide(
    denoise_cond: Denoiser, denoise_uncond: Denoiser, scale, *, interval=None
) -> Denoiser:
    """EDM2's classifier-free guidance with a separate unconditional network (its -guid- presets)."""
    return autoguidance(denoise_cond, denoise_uncond, scale, interval=interval)


def _check_interval(interval) -> tuple[float, float]:
    """(lo, hi) of a guidance interval; None = every sigma."""
    if interval is None:
        return 0.0, math.inf
    lo, hi = (float(v) for v in interval)
    if not 0 <= lo <= hi:
        raise ValueError(
            f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= lo <= hi; got {interval}"
        )
    return lo, hi


def check_guide(main, guide, *, conditional_guide: bool = True) -> None:
    """Raise ValueError unless the guide model fits the main one (geometry, labels)."""
    names = ("img_resolution", "img_resolution", "img_channels")  # (H, W, C)
    for what, a, b in zip(names, main.image_shape, guide.image_shape, strict=True):
        if a != b:
            raise ValueError(f"guide {what} {b} != main model's {a}")
    if conditional_guide and guide.label_dim != main.label_dim:
        raise ValueError(
            f"guide label_dim {guide.label_dim} != main model's {main.label_dim} (an "
            "unconditional guide, label_dim 0, is classifier-free guidance)"
        )
    if not conditional_guide and guide.label_dim != 0:
        raise ValueError(f"an unconditional guide must have label_dim 0; got {guide.label_dim}")


def gradient_guidance(
    denoise: Denoiser,
    log_prob: Callable[[Array, Array], Array],
    scale,
    *,
    through_denoiser: bool = True,
) -> Denoiser:
    """Guidance by a differentiable log p(y | x): D' = D + scale sigma^2 grad_x log_prob.

    ``log_prob(denoised [B, ...], sigma [B]) -> [B]`` is any differentiable function of the
    denoised image (log-probability of a classifier, minus a CLIP loss, ...). Since
    D = x + sigma^2 score (Tweedie), adding its gradient to the score adds sigma^2 times it
    to D. With ``through_denoiser`` the gradient is taken w.r.t. x through D (universal
    guidance); otherwise w.r.t. the denoised image directly (cheaper, no network backprop).
    """
    _check_scale(scale)
    if not isinstance(through_denoiser, bool):
        raise ValueError(f"through_denoiser must be True or False, got {through_denoiser!r}")

    def guided(x: Array, sigma) -> Array:
        sigma = _sigma_b(sigma, x)

        def objective(x_):
            D = denoise(x_, sigma)
            return jnp.sum(log_prob(D, sigma)), D

        if through_denoiser:
            grad, D = jax.grad(objective, has_aux=True)(x)
        else:
            D = denoise(x, sigma)
            grad = jax.grad(lambda d: jnp.sum(log_prob(d, sigma)))(jax.lax.stop_gradient(D))
        return D + scale * append_dims(sigma, x.ndim) ** 2 * grad

    return guided


class WrappedModel(abc.ABC):
    """``types.SampleableModel`` of a model that wraps another (``inner``): geometry, labels,
    sigma range, clipping and latent decoding are the inner model's, passed on explicitly."""

    @property
    @abc.abstractmethod
    def inner(self) -> Any:
        """The wrapped model (each wrapper names its own)."""

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The inner model's (H, W, C)."""
        return self.inner.image_shape

    @property
    def label_dim(self) -> int:
        """The inner model's number of classes."""
        return self.inner.label_dim

    @property
    def sigma_min(self) -> float:
        """The inner model's lowest noise level."""
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        """The inner model's highest noise level."""
        return self.inner.sigma_max

    @property
    def clip_output(self) -> bool:
        """Whether the inner model's samples are clipped to [-1, 1]."""
        return self.inner.clip_output

    @property
    def encoder(self) -> Any:
        """The inner model's latent decoder (None for pixel models)."""
        return self.inner.encoder

    @property
    def null_label(self) -> str:
        """The inner model's unconditional label for classifier-free guidance."""
        return self.inner.null_label

    @property
    def takes_key(self) -> bool:
        """Whether the inner model's denoiser takes a key."""
        return self.inner.takes_key

    def round_sigma(self, sigma) -> Array:
        """The inner model's nearest noise level."""
        return self.inner.round_sigma(sigma)


@dataclasses.dataclass(frozen=True)
class GuidedModel(WrappedModel):
    """A model whose denoiser is guided by a second model: pass ``(params, guide_params)``.

    ``edm_jax.sample(rng, (params, guide_params), GuidedModel(main, guide, 2.0), ...)``
    samples with autoguidance (a conditional guide) or EDM2's classifier-free guidance (an
    unconditional guide, label_dim 0); ``interval`` limits guidance to sigma in [lo, hi].
    """

    main: Any
    guide: Any
    scale: float
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        check_guide(self.main, self.guide, conditional_guide=self.guide.label_dim != 0)
        _check_scale(self.scale)
        _check_interval(self.interval)

    @property
    def inner(self) -> Any:
        """The main model: geometry, labels and sigma range are its."""
        return self.main

    def denoise(self, params, x, sigma, labels=None, **kw) -> Array:
        """D_guide + scale (D_main - D_guide), labels given to a conditional guide only."""
        p_main, p_guide = params
        glabels = labels if self.guide.label_dim else None

        def main(x_, s):
            return self.main.denoise(p_main, x_, s, labels=labels, **kw)

        def guide(x_, s):
            return self.guide.denoise(p_guide, x_, s, labels=glabels, **kw)

        return autoguidance(main, guide, self.scale, interval=self.interval)(x, sigma)


# --------------------------------------------------------------------------- classifier guidance


def vp_c_in(sigma: Array) -> Array:
    """Input scaling of variance-preserving models: x_t = x / sqrt(sigma^2 + 1)."""
    return 1 / jnp.sqrt(sigma**2 + 1)


def classifier_log_prob(
    classifier: Callable[[Array, Array], Array],
    labels: Array,
    sigma_to_t: Callable[[Array], Array],
    c_in: Callable[[Array], Array] = vp_c_in,
) -> Callable[[Array, Array], Array]:
    """log p(y | x; sigma) [B] = log_softmax(classifier(x c_in(sigma), t(sigma)))[y].

    ``classifier(x_in, t) -> logits [B, K]`` is a noisy-image classifier in its own input
    space (guided-diffusion's sees x_t = x c_in at the DDPM timestep t); ``labels`` [B] ints.
    """
    labels = jnp.asarray(labels)

    def log_prob(x: Array, sigma: Array) -> Array:
        x_in = x * append_dims(c_in(sigma), x.ndim).astype(x.dtype)
        logits = classifier(x_in, sigma_to_t(sigma)).astype(jnp.float32)  # [B, K]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]

    return log_prob


def classifier_guidance(
    denoise: Denoiser,
    classifier: Callable[[Array, Array], Array],
    labels: Array,
    scale,
    *,
    sigma_to_t: Callable[[Array], Array],
    c_in: Callable[[Array], Array] = vp_c_in,
) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021) in k-diffusion form: D' = D + s sigma^2 g.

    g = grad_x log p(y | x; sigma) of the noisy input x (``classifier_log_prob``), the
    gradient guided-diffusion's ``cond_fn`` takes w.r.t. x_t times c_in (chain rule), and
    s = ``scale`` (its ``classifier_scale``). Adding s g to the score, D = x + sigma^2 score
    (Tweedie) gains s sigma^2 g: the denoiser form of guided-diffusion's ``condition_score``
    (eps' = eps - sqrt(1 - abar) s grad_{x_t}) and k-diffusion's ``make_cond_model_fn``.
    Unlike ``gradient_guidance`` the classifier sees the noisy x, not the denoised image.
    """
    _check_scale(scale)
    log_prob = classifier_log_prob(classifier, labels, sigma_to_t, c_in)

    def guided(x: Array, sigma) -> Array:
        sigma = _sigma_b(sigma, x)
        grad = jax.grad(lambda x_: jnp.sum(log_prob(x_, sigma)))(x)
        D = denoise(x, sigma)
        return D + scale * append_dims(sigma, x.ndim) ** 2 * grad.astype(D.dtype)

    return guided


@dataclasses.dataclass(frozen=True)
class ClassifierGuidedModel(WrappedModel):
    """A model sampled with classifier guidance: pass ``(params, classifier_params)``.

    ``edm_jax.sample(rng, (params, cls_params), ClassifierGuidedModel(model, classifier,
    num_classes, scale, sigma_to_t=...), labels=...)`` guides ``model`` (anything with
    ``denoise(params, x, sigma, labels=None)``, e.g. a ``wrappers.SamplingModel``) towards
    the class of each seed; ``classifier(x_in, t, params) -> logits``. ``sigma_to_t`` is
    the classifier's time (e.g. ``OpenAIDenoiser(...).sigma_to_t``); labels go to the
    model too when it is class-conditional (``label_dim`` > 0).
    """

    model: Any
    classifier: Callable[[Array, Array, Any], Array]
    num_classes: int
    scale: float
    sigma_to_t: Callable[[Array], Array]
    c_in: Callable[[Array], Array] = vp_c_in

    def __post_init__(self):
        _check_scale(self.scale)
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {n!r}")
        model_dim = int(self.model.label_dim or 0)
        if model_dim not in (0, n):
            raise ValueError(f"the model has {model_dim} classes, the classifier {n}")

    @property
    def label_dim(self) -> int:
        """The classifier's number of classes: sample() draws one per seed."""
        return self.num_classes

    @property
    def inner(self) -> Any:
        """The guided model: geometry, sigma range and clipping are its."""
        return self.model

    def denoise(self, params, x, sigma, labels=None, **kw) -> Array:
        """D + scale sigma^2 grad_x log p(argmax labels | x; sigma)."""
        p_model, p_cls = params
        if labels is None:
            raise ValueError("classifier guidance needs labels (one-hot [B, num_classes])")
        y = jnp.argmax(labels, axis=-1)  # [B]
        model_labels = labels if self.model.label_dim else None

        def denoise(x_, s):
            return self.model.denoise(p_model, x_, s, labels=model_labels, **kw)

        def classifier(x_in, t):
            return self.classifier(x_in, t, p_cls)

        guided = classifier_guidance(
            denoise, classifier, y, self.scale, sigma_to_t=self.sigma_to_t, c_in=self.c_in
        )
        return guided(x, sigma)
