"""Shared types: the one denoiser convention, the noise-sampler callable, the sampleable model.

A ``Denoiser`` is ``denoise(x, sigma, **cond) -> D(x; sigma)`` with ``x`` [B, ...] and
``sigma`` [B]; parameters and conditioning are closed over (``functools.partial``) or passed
by keyword. Models (``DiffusionModel``) expose ``model.denoise(params, x, sigma, **cond)``;
``functools.partial(model.denoise, params)`` is a Denoiser. ``SampleableModel`` is all that
``edm_jax.sample`` reads of a model; every model kind implements it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

Array = jax.Array
Denoiser = Callable[..., Array]  # denoise(x [B, ...], sigma [B], **cond) -> D [B, ...]
NoiseSampler = Callable[[Array, Array], Array]  # (sigma, sigma_next) -> N(0, I) like x
StepCallback = Callable[[dict[str, Any]], Any]  # k-diffusion's per-step callback(info)

__all__ = ["Array", "Denoiser", "NoiseSampler", "SampleableModel", "StepCallback"]


@runtime_checkable
class SampleableModel(Protocol):
    """What ``edm_jax.sample`` reads of a model (NVlabs' preconditioners expose the same
    ``sigma_min`` / ``sigma_max`` / ``label_dim`` / ``round_sigma``).

    Implemented by ``nets.model.DiffusionModel`` (EDM, EDM2), ``nets.kdiff_models.
    KDiffusionModel``, ``wrappers.SamplingModel`` (guided-diffusion, v-diffusion, any wrapped
    eps/v/x0 model), ``sd.pipeline.TextConditionedModel`` and the guided wrappers
    (``guidance.GuidedModel``, ``guidance.ClassifierGuidedModel``, ``clip.guidance.
    CLIPGuidedModel``), which pass their inner model's values on explicitly.
    """

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of what the sampler draws (latents for latent models)."""
        ...

    @property
    def label_dim(self) -> int:
        """Number of classes; 0 for an unconditional model."""
        ...

    @property
    def sigma_min(self) -> float:
        """Lowest noise level the model is defined at (0.0 when unbounded)."""
        ...

    @property
    def sigma_max(self) -> float:
        """Highest noise level the model is defined at (inf when unbounded)."""
        ...

    @property
    def clip_output(self) -> bool:
        """Whether samples are clipped to [-1, 1] (pixel models; not latents)."""
        ...

    @property
    def encoder(self) -> Any:
        """A latent model's VAE (``nets.model.LatentEncoder``: ``decode(latents)`` -> images
        in [-1, 1]), else None."""
        ...

    @property
    def null_label(self) -> str:
        """Classifier-free guidance's unconditional label: 'zero' (a zero one-hot, one
        batched call) or 'learned' (``labels=None``, a separate call)."""
        ...

    @property
    def takes_key(self) -> bool:
        """Whether ``denoise`` takes ``key=`` (random guidance, e.g. CLIP's translations)."""
        ...

    def round_sigma(self, sigma: Any) -> Array:
        """The model's own noise level nearest to sigma (identity for continuous models)."""
        ...

    def denoise(self, *args: Any, **kwargs: Any) -> Array:
        """``denoise(params, x, sigma, labels=None, **cond)``: D(x; sigma) [B, H, W, C] for
        x [B, H, W, C], sigma [B], labels one-hot [B, label_dim] or None."""
        ...
