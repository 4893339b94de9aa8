"""CLIP in Flax (OpenAI and open_clip), its tokenizer, weight conversion and CLIP guidance."""

from edm_jax.clip.model import (
    CLIP,
    PRESETS,
    CLIPConfig,
    l2_normalize,
    normalize_images,
    preset,
    text_tower,
)
from edm_jax.clip.tokenizer import Tokenizer, TokenizerError, default_tokenizer

__all__ = [
    "CLIP",
    "PRESETS",
    "CLIPConfig",
    "Tokenizer",
    "TokenizerError",
    "default_tokenizer",
    "l2_normalize",
    "normalize_images",
    "preset",
    "text_tower",
]
