"""Stable Diffusion as a text-conditioned denoiser: the model object and ``text_to_image``.

``StableDiffusion`` holds the LDM U-Net, the VAE and the text encoder of one checkpoint; its
U-Net is wrapped as k-diffusion wraps it (``CompVisDenoiser`` for eps, ``CompVisVDenoiser`` for
v, over the LDM float32 ``alphas_cumprod``), so every sampler and every sigma schedule applies.
Classifier-free guidance runs the prompt and the negative prompt in ONE batched U-Net call
(``guidance.cfg``). ``text_to_image`` samples latents per seed (``fold_in(rng, seed)``, so a
seed's image does not depend on its batch), decodes them with the VAE (latents / 0.18215) and
returns uint8 images; its compiled program takes the text embeddings, guidance scale and
sigmas as arguments, so one compile serves every prompt and schedule of a step count.
``as_sampling_model`` gives the same guided denoiser in the form ``edm_jax.sample`` takes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import guidance, schedules, wrappers
from edm_jax.nets.ldm_unet import LDMUNet
from edm_jax.nets.vae import AutoencoderKL, DiagonalGaussian

Array = jax.Array

__all__ = ["PREDICTIONS", "StableDiffusion", "TextEncoder", "TextConditionedModel"]

PREDICTIONS = {"eps": wrappers.CompVisDenoiser, "v": wrappers.CompVisVDenoiser}


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A tokenizer and a text tower: prompts -> token ids [N, L] -> context [N, L, context_dim]."""

    tokenize: Callable[[Sequence[str]], np.ndarray]  # -> int32 [N, L] (truncating, warning)
    apply: Callable[[Any, Array], Array]  # (params, ids [N, L]) -> [N, L, context_dim]
    context_dim: int
    max_tokens: int = 77


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """U-Net, VAE and text encoder of one SD checkpoint; params are {'unet', 'vae', 'text'}."""

    unet: LDMUNet
    vae: AutoencoderKL
    text: TextEncoder
    prediction: str  # 'eps' (SD 1.x, SD 2 base) or 'v' (SD 2.x 768-v)
    variant: str  # 'sd1' or 'sd2'
    alphas_cumprod: np.ndarray = dataclasses.field(
        default_factory=lambda: wrappers.ldm_alphas_cumprod().astype(np.float32)
    )

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction {self.prediction!r}; valid: {sorted(PREDICTIONS)}"
            )
        if self.text.context_dim != self.unet.context_dim:
            raise ValueError(
                f"text encoder width {self.text.context_dim} != U-Net context_dim "
                f"{self.unet.context_dim}"
            )

    @property
    def scale_factor(self) -> float:
        """Latents = VAE mean * scale_factor (0.18215 for SD 1.x and 2.x)."""
        return float(self.vae.cfg.scaling_factor)

    @property
    def downsample(self) -> int:
        """Pixels per latent along each axis (8 for the SD VAE)."""
        return 2 ** (len(self.vae.cfg.block_out_channels) - 1)

    def denoiser(self, unet_params: Any) -> Any:
        """k-diffusion's wrapper of the U-Net: ``D(x, sigma, labels=context [B,S,D])``."""

        def model(x_in, t, labels):
            return self.unet.apply({"params": unet_params}, x_in, t, labels)

        return PREDICTIONS[self.prediction](model, self.alphas_cumprod)

    @functools.cached_property
    def _table(self) -> Any:
        """The discrete sigma table (no model)."""
        return PREDICTIONS[self.prediction](_no_model, self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        """Lowest noise level of the LDM schedule (0.0292)."""
        return float(self._table.sigma_min)

    @property
    def sigma_max(self) -> float:
        """Highest noise level of the LDM schedule (14.6146)."""
        return float(self._table.sigma_max)

    def guided(self, unet_params: Any, cond: Array, uncond: Array, scale) -> Callable:
        """D_uncond + scale (D_cond - D_uncond), both halves in one batched U-Net call."""
        return guidance.cfg(self.denoiser(unet_params), scale, cond, uncond, batched=True)

    def decode(self, vae_params: Any, latents: Array) -> Array:
        """Images in [-1, 1] [B, H, W, 3] of latents [B, h, w, 4] (divided by scale_factor)."""
        z = latents.astype(jnp.float32) / self.scale_factor
        x: Array = self.vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode)  # type: ignore[assignment]
        return jnp.clip(x, -1.0, 1.0)

    def encode_images(self, vae_params: Any, images: Array, keys: Array) -> Array:
        """Latents [B, h, w, 4] of images [B, H, W, 3] in [-1, 1]: a draw of the VAE's Gaussian
        (one key per row, as diffusers' ``latent_dist.sample``) times scale_factor."""
        moments = self.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
        dist = DiagonalGaussian.from_moments(moments)  # type: ignore[arg-type]
        noise = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, dist.mean)
        return (dist.mean + dist.std * noise) * self.scale_factor

    def encode_prompts(self, text_params: Any, prompts: Sequence[str]) -> np.ndarray:
        """Context [N, L, D] (float32) of each prompt; one compile, one prompt at a time."""
        ids = self.text.tokenize(list(prompts))
        encode = _encoder(self)
        return np.stack([np.asarray(encode(text_params, jnp.asarray(i[None])))[0] for i in ids])

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latents for an image size; ValueError unless it fits the networks."""
        f = self.downsample
        unit = f * 2 ** (len(self.unet.channel_mult) - 1)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < unit:
                raise ValueError(f"{name} must be an int >= {unit}, got {v!r}")
            if v % unit:
                raise ValueError(
                    f"{name} {v} is not a multiple of {unit} (the VAE's {f}x downsampling times "
                    f"the U-Net's {unit // f}x); try {v - v % unit} or {v - v % unit + unit}"
                )
        return height // f, width // f


def _no_model(*args: Any, **kwargs: Any) -> Array:
    """Stands in for the U-Net where only the sigma table is used."""
    raise AssertionError("the sigma table has no model")


_ENCODERS: dict[int, tuple[Any, Callable]] = {}


def _encoder(pipe: StableDiffusion) -> Callable:
    """The jitted text tower of a pipeline (cached per pipeline object)."""
    entry = _ENCODERS.get(id(pipe))
    if entry is None or entry[0] is not pipe:
        entry = _ENCODERS[id(pipe)] = (pipe, jax.jit(pipe.text.apply))
    return entry[1]


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditionedModel:
    """A pipeline with its text conditioning in ``params``, in the form ``edm_jax.sample`` takes.

    params = {'unet', 'context': [2, S, D] (prompt, negative prompt), 'cfg_scale': scalar};
    ``sample`` then returns latents (no clipping); ``pipe.decode`` turns them into images.
    """

    pipe: StableDiffusion
    image_shape: tuple[int, int, int]  # latent (h, w, 4)
    label_dim: int = 0
    clip_output: bool = False
    encoder = None  # types.SampleableModel: latents out, decoded by pipe.decode
    null_label = "zero"
    takes_key = False

    def round_sigma(self, sigma) -> Array:
        """Identity: sampled at the schedule's sigmas as they are."""
        return jnp.asarray(sigma)

    @property
    def sigma_min(self) -> float:
        """The LDM schedule's lowest sigma."""
        return self.pipe.sigma_min

    @property
    def sigma_max(self) -> float:
        """The LDM schedule's highest sigma."""
        return self.pipe.sigma_max

    def denoise(self, params: Any, x: Array, sigma, labels=None) -> Array:
        """The guided D(x; sigma) for every row of x (labels are not used)."""
        if labels is not None:
            raise ValueError("a text-conditioned model takes its prompts in params, not labels")
        ctx = params["context"].astype(jnp.float32)
        cond = jnp.broadcast_to(ctx[0], (x.shape[0], *ctx.shape[1:]))
        uncond = jnp.broadcast_to(ctx[1], cond.shape)
        return self.pipe.guided(params["unet"], cond, uncond, params["cfg_scale"])(x, sigma)


def as_sampling_model(
    pipe: StableDiffusion, params: dict, prompt: str, negative_prompt: str = "",
    *, cfg_scale: float = 7.5, height: int = 512, width: int = 512,
) -> tuple[TextConditionedModel, dict]:  # fmt: skip
    """(model, params) for ``edm_jax.sample`` with one prompt; sample() returns latents."""
    h, w = pipe.check_size(height, width)
    ctx = pipe.encode_prompts(params["text"], [prompt, negative_prompt])
    model = TextConditionedModel(pipe, (h, w, pipe.unet.in_channels))
    return model, {"unet": params["unet"], "context": ctx, "cfg_scale": jnp.float32(cfg_scale)}


# ---- the sigma grids of text_to_image


def _diffusers(spacing: str) -> Callable:
    def grid(pipe: StableDiffusion, n: int) -> np.ndarray:
        return wrappers.diffusers_sigmas(pipe.alphas_cumprod, n, spacing, steps_offset=1)

    return grid


# name -> fn(pipe, n) -> n + 1 sigmas ending in 0 (k-diffusion's get_sigmas_*, diffusers' grids)
T2I_SCHEDULES: dict[str, Callable[[StableDiffusion, int], Any]] = {
    "karras": lambda p, n: schedules.karras(n, p.sigma_min, p.sigma_max, rho=7.0),
    "exponential": lambda p, n: schedules.exponential(n, p.sigma_min, p.sigma_max),
    "polyexponential": lambda p, n: schedules.polyexponential(n, p.sigma_min, p.sigma_max),
    "discrete": lambda p, n: p._table.get_sigmas(n),  # k-diffusion model_wrap.get_sigmas(n)
    "leading": _diffusers("leading"),  # diffusers' SD scheduler default (steps_offset 1)
    "trailing": _diffusers("trailing"),
    "linspace": _diffusers("linspace"),
}
