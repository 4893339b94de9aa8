"""``text_to_image``: prompts -> uint8 images with any sampler and schedule, per-seed keys.

As ``edm_jax.sample``: seed s draws its initial latents from ``fold_in(fold_in(rng, s), 0)``
and its sampler noise from ``fold_in(fold_in(rng, s), 2)``; the sampler is vmapped over seeds
(each sees a batch of one) while the U-Net runs on the whole batch, prompt and negative prompt
together; batches are padded to one shape and split over the local devices. The program is
compiled once per (pipeline, sampler, size, steps, options, guided) and takes the text
embeddings, guidance scale and sigmas as arguments, so changing prompts, seeds, scale or
schedule reuses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import api, sharding
from edm_jax.checks import check_choice
from edm_jax.samplers import SAMPLER_INFO, canonical_name
from edm_jax.samplers.checks import check_scalar
from edm_jax.sd.pipeline import T2I_SCHEDULES, StableDiffusion

Array = jax.Array

__all__ = ["T2I_SCHEDULES", "text_to_image", "t2i_sigmas"]

_KEY_INIT, _KEY_ENCODE, _KEY_NOISE = 0, 1, 2  # as api.sample (1: its label key)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything that fixes the compiled program besides the pipeline."""

    sampler: str
    latent_shape: tuple[int, int, int]
    num_steps: int
    guided: bool
    options: tuple
    img2img: bool = False


def t2i_sigmas(pipe: StableDiffusion, schedule: str, steps: int) -> np.ndarray:
    """The n + 1 sigmas (float32, ending in 0) of a schedule name in T2I_SCHEDULES."""
    check_choice("schedule", schedule, T2I_SCHEDULES)
    return np.asarray(T2I_SCHEDULES[schedule](pipe, steps), np.float32)


def _solve(pipe: StableDiffusion, spec: _Spec, denoise: Callable, x: Array, sigmas, key) -> Array:
    """Run the sampler on one seed's latents x [1, h, w, 4]."""
    info = SAMPLER_INFO[spec.sampler]
    options = dict(spec.options)
    if info.takes == "range":  # dpm_fast / dpm_adaptive: the model's own sigma range
        lo, hi = pipe.sigma_min, pipe.sigma_max
        args = (lo, hi, spec.num_steps) if info.takes_n else (lo, hi)
        return info.fn(denoise, x, *args, rng=key, **options)
    return info.fn(denoise, x, sigmas, rng=key, **options)


def _program(pipe: StableDiffusion, spec: _Spec) -> Callable:
    """Jitted (params, keys [B], context [B, 2, S, D], scale, sigmas, init images [B, H, W, 3] |
    None) -> images [B, H, W, 3]; with init images the sampler starts from their latents."""

    def one(params, key, ctx, scale, sigmas, init):
        x = jax.random.normal(jax.random.fold_in(key, _KEY_INIT), (1, *spec.latent_shape))
        x = x * sigmas[0]  # k-diffusion: x = randn * sigmas[0]
        if init is not None:  # img2img: the init latents noised to the first sigma
            x = x + init[None]
        if spec.guided:
            denoise = pipe.guided(params["unet"], ctx[None, 0], ctx[None, 1], scale)
        else:
            denoise = _with_context(pipe.denoiser(params["unet"]), ctx[None, 0])
        return _solve(pipe, spec, denoise, x, sigmas, jax.random.fold_in(key, _KEY_NOISE))[0]

    def run(params, keys, ctx, scale, sigmas, images):
        init = None
        if images is not None:
            pixels = images.astype(jnp.float32) / 127.5 - 1.0
            enc_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, _KEY_ENCODE)
            init = pipe.encode_images(params["vae"], pixels, enc_keys)
        one_b = jax.vmap(one, in_axes=(None, 0, 0, None, None, 0))
        return pipe.decode(params["vae"], one_b(params, keys, ctx, scale, sigmas, init))

    return jax.jit(run)


def _with_context(denoise: Callable, ctx: Array) -> Callable:
    """denoise(x, sigma) with the context closed over (no guidance)."""
    return lambda x, sigma: denoise(x, sigma, labels=ctx)


_PROGRAMS: dict[tuple, tuple[Any, Callable]] = {}


def _cached_program(pipe: StableDiffusion, spec: _Spec) -> Callable:
    """One jitted program per (pipeline object, spec); the pipeline is held so its id stays valid."""
    entry = _PROGRAMS.get((id(pipe), spec))
    if entry is None:
        if len(_PROGRAMS) >= 16:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        entry = _PROGRAMS[(id(pipe), spec)] = (pipe, _program(pipe, spec))
    return entry[1]


def _per_seed(name: str, value: str | Sequence[str], n: int) -> list[str]:
    """A prompt (or list of 1 or n prompts) as n prompts, one per seed."""
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items) or len(items) not in (1, n):
        raise ValueError(f"{name} must be a string or a list of 1 or {n} strings, got {value!r}")
    return items * n if len(items) == 1 else items


def _contexts(pipe, params, prompts: list[str], negatives: list[str]) -> np.ndarray:
    """[N, 2, S, D]: each seed's prompt and negative-prompt embeddings (each prompt encoded once)."""
    unique = sorted(set(prompts) | set(negatives))
    table = dict(zip(unique, pipe.encode_prompts(params["text"], unique), strict=True))
    return np.stack(
        [np.stack([table[p], table[q]]) for p, q in zip(prompts, negatives, strict=True)]
    )


def _check(sampler: str, steps: int, cfg_scale, options: dict) -> str:
    """The canonical sampler name after checking every scalar argument (before compute)."""
    api.check_sample_args(sampler, steps, None, **options)
    check_scalar("cfg_scale", cfg_scale)
    return canonical_name(sampler)


def text_to_image(
    rng: Array,
    pipe: StableDiffusion,
    params: dict,
    prompts: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    *,
    sampler: str = "dpmpp_2m",
    schedule: str = "karras",
    steps: int = 25,
    cfg_scale: float = 7.5,
    seeds: Sequence[int] | np.ndarray = (0,),
    height: int = 512,
    width: int = 512,
    batch_size: int | None = None,
    init_images: np.ndarray | None = None,
    strength: float = 0.75,
    **sampler_options,
) -> np.ndarray:
    """uint8 images [N, height, width, 3], one per seed (prompts: one, or one per seed).

    ``cfg_scale`` 1 turns guidance off (the negative prompt is then unused); schedules are
    T2I_SCHEDULES (k-diffusion's karras / exponential / polyexponential / discrete, diffusers'
    leading / trailing / linspace), all within the LDM sigma range. img2img: ``init_images``
    uint8 [1 or N, height, width, 3] are encoded, noised to the schedule's sigma at ``strength``
    (its last ``int(steps * strength)`` steps run, as diffusers) and denoised from there.
    """
    sampler = _check(sampler, steps, cfg_scale, sampler_options)
    check_choice("schedule", schedule, T2I_SCHEDULES)
    latent = (*pipe.check_size(height, width), pipe.unet.in_channels)
    seed_arr = api._resolve_seeds(None, seeds)
    n, bs = len(seed_arr), api._batch_size(batch_size, len(seed_arr))
    prompts_n = _per_seed("prompts", prompts, n)
    negatives = _per_seed("negative_prompt", negative_prompt, n)
    sigmas = t2i_sigmas(pipe, schedule, steps)
    images = None
    if init_images is not None:
        images, sigmas = _img2img(sampler, init_images, strength, sigmas, (height, width), n)
    spec = _Spec(sampler, latent, steps, float(cfg_scale) != 1.0,
                 tuple(sorted(sampler_options.items())), images is not None)  # fmt: skip
    program = _cached_program(pipe, spec)
    ctx = _contexts(pipe, params, prompts_n, negatives)
    scale = jnp.float32(cfg_scale)
    return _run(program, rng, params, seed_arr, ctx, bs, scale, jnp.asarray(sigmas), images)


def _img2img(sampler, images, strength, sigmas, size, n) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, H, W, 3], the schedule's last int(steps * strength) steps), checked."""
    check_scalar("strength", strength)
    steps = len(sigmas) - 1
    k = int(steps * float(strength))
    if not 0 < float(strength) <= 1 or k < 1:
        raise ValueError(
            f"strength must be in (0, 1] and leave >= 1 of {steps} steps, got {strength}"
        )
    if SAMPLER_INFO[sampler].takes == "range":
        raise ValueError(f"img2img needs a sampler on a sigma grid; {sampler!r} takes a range")
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (*size, 3) or len(a) not in (1, n):
        raise ValueError(
            f"init_images must be uint8 [1 or {n}, {size[0]}, {size[1]}, 3], got {a.dtype}{a.shape}"
        )
    return np.broadcast_to(a, (n, *a.shape[1:])), sigmas[steps - k :]


def _run(program, rng, params, seeds, ctx, bs, scale, sigmas, images=None) -> np.ndarray:
    """The program on padded batches of seeds (split over devices); uint8 images of the seeds."""
    mesh = sharding.batch_mesh(bs)
    params = sharding.place(params, mesh, sharding.REPLICATED)
    out = []
    for start in range(0, len(seeds), bs):
        idx = api._pad(np.arange(start, min(start + bs, len(seeds))), bs)
        keys = api._seed_keys(rng, jnp.asarray(seeds[idx] % 2**32, jnp.uint32))
        init = None if images is None else jnp.asarray(images[idx])
        batch = sharding.place((keys, jnp.asarray(ctx[idx]), init), mesh, sharding.BATCH)
        pixels = program(params, batch[0], batch[1], scale, sigmas, batch[2])
        out.append(api.to_uint8(jax.device_get(pixels))[: min(bs, len(seeds) - start)])
    return np.concatenate(out)
