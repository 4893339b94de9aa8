"""The SD text encoders, from the project's Flax CLIP (``edm_jax.clip``).

- SD 1.x: OpenAI CLIP ViT-L/14's text tower, the last layer's hidden states after the final
  LayerNorm (CompVis ``FrozenCLIPEmbedder``). Single files hold it in HF ``CLIPTextModel``
  names under ``cond_stage_model.transformer.text_model.``; ``hf_to_openai_text`` renames them
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

__all__ = ["convert_text_encoder", "hf_to_openai_text", "text_encoder"]

_HF_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _hf_layer_name(i: str, rest: str) -> str | None:
    """OpenAI name of one HF encoder-layer parameter (None for q/k/v, joined separately)."""
    for hf, oa in _HF_LAYER.items():
        if rest.startswith(hf + "."):
            return f"transformer.resblocks.{i}.{oa}{rest[len(hf) :]}"
    if re.match(r"self_attn\.[qkv]_proj\.", rest):
        return None
    raise ValueError(f"unknown HF CLIP text parameter 'encoder.layers.{i}.{rest}'")


def hf_to_openai_text(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF CLIPTextModel state_dict (names under 'text_model.') -> OpenAI CLIP text names."""
    out: dict[str, np.ndarray] = {}
    for name, v in sd.items():
        name = name.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue  # a buffer
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", name)
        if m is None:
            if name not in _HF_TOP:
                raise ValueError(f"unknown HF CLIP text parameter {name!r}")
            out[_HF_TOP[name]] = v
            continue
        oa = _hf_layer_name(m.group(1), m.group(2))
        if oa is not None:
            out[oa] = v
            continue
        for leaf in ("weight", "bias"):
            qkv = [
                f"text_model.encoder.layers.{m.group(1)}.self_attn.{c}_proj.{leaf}" for c in "qkv"
            ]
            if all(k in sd for k in qkv):
                out[f"transformer.resblocks.{m.group(1)}.attn.in_proj_{leaf}"] = np.concatenate(
                    [sd[k] for k in qkv]
                )
    return out


def convert_text_encoder(variant: str, sd: dict[str, np.ndarray]) -> tuple[dict, Any]:
    """(text config, Flax params) of a checkpoint's cond_stage_model part (prefix stripped)."""
    raise NotImplementedError("the SD text encoders need edm_jax.clip (branch clip)")


def text_encoder(variant: str, config: dict, vocab: str | None = None) -> Any:
    """The TextEncoder (tokenizer + hidden states) of a text config."""
    raise NotImplementedError("the SD text encoders need edm_jax.clip (branch clip)")
