"""Stable Diffusion text-to-image over the LDM U-Net, the SD VAE and the Flax CLIP text towers.

``load_pipeline(path)`` reads a released single-file checkpoint (.ckpt / .safetensors) without
torch and caches its converted parameters; ``text_to_image(rng, pipe, params, prompts, ...)``
samples it with any sampler and schedule; ``as_sampling_model`` hands it to ``edm_jax.sample``.
"""

from edm_jax.sd.generate import T2I_SCHEDULES, t2i_sigmas, text_to_image
from edm_jax.sd.load import describe, is_sd_checkpoint, load_pipeline
from edm_jax.sd.pipeline import (
    PREDICTIONS,
    StableDiffusion,
    TextConditionedModel,
    TextEncoder,
    as_sampling_model,
)

__all__ = [
    "PREDICTIONS",
    "T2I_SCHEDULES",
    "StableDiffusion",
    "TextConditionedModel",
    "TextEncoder",
    "as_sampling_model",
    "describe",
    "is_sd_checkpoint",
    "load_pipeline",
    "t2i_sigmas",
    "text_to_image",
]
