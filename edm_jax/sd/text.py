"""The SD text encoders, from the project's Flax CLIP (``edm_jax.clip``).

- SD 1.x: OpenAI CLIP ViT-L/14's text tower, the last layer's hidden states after the final
  LayerNorm (CompVis ``FrozenCLIPEmbedder``). Single files hold it in HF ``CLIPTextModel``
  names under ``cond_stage_model.transformer.text_model.``; ``edm_jax.clip.convert.hf_text_to_openai`` renames them
  to OpenAI's (q/k/v joined into ``in_proj``). HF's tokenizer pads with <|endoftext|>.
- SD 2.x: OpenCLIP ViT-H/14's text tower, the penultimate layer's hidden states, then
  ``ln_final`` (``FrozenOpenCLIPEmbedder``, layer='penultimate'); open_clip names under
  ``cond_stage_model.model.``; its tokenizer pads with 0.

A prompt longer than the 77-token context is truncated (its last token made <|endoftext|>)
with a warning, as both references truncate.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["TEXT_LAYERS", "convert_text_encoder", "text_encoder"]

# SD version -> (key prefix below cond_stage_model., activation, hidden layer, padding token)
TEXT_LAYERS: dict[str, tuple[str, str, int, str]] = {
    "sd1": ("transformer.", "quick_gelu", -1, "eot"),  # HF CLIPTextModel, last layer
    "sd2": ("model.", "gelu", -2, "zero"),  # open_clip, penultimate layer
}


def _openai_names(variant: str, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The text tower's state_dict in OpenAI names (HF names renamed, q/k/v joined, for SD 1)."""
    from edm_jax.clip import convert as clip_convert

    prefix = TEXT_LAYERS[variant][0]
    tower = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if variant == "sd1":
        return clip_convert.hf_text_to_openai(tower)
    return {k: v for k, v in tower.items() if not k.startswith("visual.") and k != "logit_scale"}


def _clip_config(cfg: dict) -> Any:
    """A CLIPConfig whose text tower is cfg's (the vision fields are unused placeholders)."""
    from edm_jax.clip.model import CLIPConfig

    return CLIPConfig(
        embed_dim=cfg["width"], image_resolution=14, vision_layers=1, vision_width=64,
        vision_patch_size=14, vision_heads=1, context_length=cfg["context_length"],
        vocab_size=cfg["vocab_size"], transformer_width=cfg["width"],
        transformer_heads=cfg["heads"], transformer_layers=cfg["layers"],
        activation=cfg["activation"],
    )  # fmt: skip


def infer_text_config(variant: str, oa: dict[str, np.ndarray]) -> dict[str, Any]:
    """The text tower's config from OpenAI-named shapes; heads = width // 64 as every release."""
    if "token_embedding.weight" not in oa:
        raise ValueError(
            f"the {variant} text encoder has no token embedding (first keys: {list(oa)[:4]})"
        )
    vocab, width = oa["token_embedding.weight"].shape
    layers = 1 + max(
        int(m[1]) for k in oa if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))
    )
    _, activation, layer, pad = TEXT_LAYERS[variant]
    return dict(
        width=int(width), heads=max(1, int(width) // 64), layers=layers, vocab_size=int(vocab),
        context_length=int(oa["positional_embedding"].shape[0]), activation=activation,
        layer=layer, pad=pad,
    )  # fmt: skip


def convert_text_encoder(
    variant: str, sd: dict[str, np.ndarray], **overrides: Any
) -> tuple[dict, Any]:
    """(text config, Flax params) of a checkpoint's cond_stage_model part (prefix stripped).

    ``overrides``: config fields the shapes do not fix (e.g. ``heads``).
    """
    from edm_jax.clip import convert as clip_convert

    oa = _openai_names(variant, sd)
    cfg = dict(infer_text_config(variant, oa), **overrides)
    params = clip_convert.from_state_dict(oa, _clip_config(cfg), text_only=True, projection=False,
                                          what=f"{variant.upper()} text encoder")  # fmt: skip
    return cfg, params["text"]


def _pad_with_eot(ids: np.ndarray) -> np.ndarray:
    """HF's SD 1 tokenizer pads with <|endoftext|>: every position after the first EOT is EOT."""
    from edm_jax.clip.tokenizer import EOT

    after = np.cumsum(ids == EOT, axis=1) > 0
    return np.where(after, EOT, ids).astype(np.int32)


def text_encoder(variant: str, config: dict, vocab: str | None = None) -> Any:
    """The TextEncoder (tokenizer + hidden states) of a text config; vocab: the BPE file."""
    from edm_jax.clip import model as clip_model
    from edm_jax.clip import tokenizer as clip_tok
    from edm_jax.sd.pipeline import TextEncoder

    tokenizer = clip_tok.default_tokenizer(vocab)  # a missing vocabulary fails here, one line
    tower = clip_model.text_tower(_clip_config(config), projection=False)
    n, layer, eot_pad = config["context_length"], config["layer"], config["pad"] == "eot"

    def tokenize(prompts):
        ids = clip_tok.tokenize_warn(tokenizer, list(prompts), n)
        return _pad_with_eot(ids) if eot_pad else ids

    def apply(params, ids):
        out = tower.apply({"params": params}, ids, layer, True, method=clip_model.TextTower.hidden)
        return out.astype(np.float32)

    return TextEncoder(tokenize, apply, config["width"], n)
