"""``sample.py``'s CLIP guidance flags: ``--clip-prompt "..." --clip-weights ViT-B-16.pt``.

k-diffusion's ``sample_clip_guided.py`` defaults apply when ``--sampler`` / ``--steps`` are
left at sample.py's defaults: ``dpmpp_2s_ancestral`` (eta 1) with 100 Karras steps, scale 500.
``--clip-image-prompt "a.png:1"`` adds image targets (v-diffusion's ``clip_sample.py`` image
prompts, the whole image resized to CLIP's input); weights are normalised over all prompts.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from edm_jax.clip import guidance as G


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLIP guidance options."""
    g = parser.add_argument_group("CLIP guidance (k-diffusion sample_clip_guided.py)")
    g.add_argument("--clip-prompt", help="text to guide towards; several as 'a:1|b:-0.5'")
    g.add_argument("--clip-image-prompt", help="image(s) to guide towards: 'a.png:1|b.png:-0.5'")
    g.add_argument(
        "--clip-weights", help="CLIP checkpoint: OpenAI .pt, open_clip .bin/.pt or .safetensors"
    )
    g.add_argument("--clip-model", default=None,
                   help="CLIP preset (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px, ViT-H-14); "
                        "default: derived from the weights (OpenAI models)")  # fmt: skip
    g.add_argument("--clip-vocab", default=None, help="bpe_simple_vocab_16e6.txt.gz (default: found "
                   "in $EDM_JAX_CLIP_VOCAB or an installed clip/open_clip package)")  # fmt: skip
    g.add_argument(
        "--clip-scale", type=float, default=G.DEFAULTS["scale"], help="CLIP guidance scale"
    )
    parser.set_defaults(
        sampling_defaults=(parser.get_default("sampler"), parser.get_default("steps"))
    )


def check(args: argparse.Namespace) -> None:
    """Refuse inconsistent CLIP flags before anything is loaded."""
    used = [f for f in ("clip_weights", "clip_model", "clip_vocab") if getattr(args, f)]
    if not (args.clip_prompt or args.clip_image_prompt):
        if used:
            raise ValueError(f"--{used[0].replace('_', '-')} needs --clip-prompt")
        return
    if not args.clip_weights:
        flag = "--clip-prompt" if args.clip_prompt else "--clip-image-prompt"
        raise ValueError(f"{flag} needs --clip-weights (a CLIP checkpoint)")
    weights = [w for _, w in _prompts(args)[0] + _prompts(args)[1]]
    if sum(weights) == 0:
        raise ValueError("CLIP prompt weights (text and image) sum to 0; they must not cancel")
    for path, _ in _prompts(args)[1]:
        if not os.path.isfile(path):
            raise ValueError(f"--clip-image-prompt: no image file {path!r}")
    if args.clip_model:
        from edm_jax.clip.model import preset

        preset(args.clip_model)


def _prompts(args: argparse.Namespace) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(text prompts, image prompts), each [(text or path, weight)]."""
    text = G.parse_prompts(args.clip_prompt) if args.clip_prompt else []
    images = G.parse_prompts(args.clip_image_prompt) if args.clip_image_prompt else []
    return text, images


def wrap(args: argparse.Namespace, model: Any, params: Any) -> tuple[Any, Any]:
    """(model, params) guided by CLIP when ``--clip-prompt`` is given; else unchanged."""
    if not (args.clip_prompt or args.clip_image_prompt):
        return model, params
    from edm_jax.clip import convert, tokenizer

    if (args.sampler, args.steps) == args.sampling_defaults:
        args.sampler, args.steps = G.DEFAULTS["sampler"], G.DEFAULTS["num_steps"]
        print(f"CLIP guidance: {args.sampler}, {args.steps} steps (k-diffusion's defaults)")
    text, images = _prompts(args)
    tok = tokenizer.default_tokenizer(args.clip_vocab) if text else None
    clip_params, config = convert.load_any(args.clip_weights, args.clip_model)
    targets = []
    if text:
        targets.append(G.text_targets(clip_params, config, tok, [p for p, _ in text]))
    if images:
        loaded = [G.load_image01(p) for p, _ in images]
        targets.append(G.image_targets(clip_params, config, loaded))
    weights = tuple(w for _, w in text + images)
    guided = G.CLIPGuidedModel(model, config, np.concatenate(targets), weights, args.clip_scale)
    return guided, (params, clip_params)
