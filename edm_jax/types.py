"""Shared types: the one denoiser convention and the noise-sampler callable.

A ``Denoiser`` is ``denoise(x, sigma, **cond) -> D(x; sigma)`` with ``x`` [B, ...] and
``sigma`` [B]; parameters and conditioning are closed over (``functools.partial``) or passed
by keyword. Models (``DiffusionModel``) expose ``model.denoise(params, x, sigma, **cond)``;
``functools.partial(model.denoise, params)`` is a Denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
Denoiser = Callable[..., Array]  # denoise(x [B, ...], sigma [B], **cond) -> D [B, ...]
NoiseSampler = Callable[[Array, Array], Array]  # (sigma, sigma_next) -> N(0, I) like x
StepCallback = Callable[[dict[str, Any]], Any]  # k-diffusion's per-step callback(info)

__all__ = ["Array", "Denoiser", "NoiseSampler", "StepCallback"]
