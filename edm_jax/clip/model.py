"""CLIP in Flax: OpenAI's ``clip.model.CLIP`` and open_clip's ``CLIP`` (ViT towers), NHWC.

One implementation for the project: CLIP guidance, the Stable Diffusion text encoders
(``text_hidden`` by layer) and CLIP features for evaluation all use it.

- Blocks: pre-LN residual attention (``ln_1``, multi-head attention with a fused q|k|v
  ``in_proj``, ``out_proj``) and MLP (``ln_2``, ``c_fc``, QuickGELU for OpenAI / exact GELU
  for open_clip, ``c_proj``); LayerNorm eps 1e-5 in float32; scale 1/sqrt(head_dim).
- Text: ``token_embedding[ids] + positional_embedding``, additive causal mask (no padding
  mask: pad positions are computed and Stable Diffusion reads them), ``ln_final``, pooling at
  ``argmax(ids)`` (the first end-of-text token), ``@ text_projection``.
- Image: patches by a bias-free strided conv, ``class_embedding`` prepended before the
  positional embedding, ``ln_pre``, blocks, ``ln_post`` on token 0, ``@ proj``.

Parameter paths follow the torch state_dict names (``text/transformer/resblocks_3/attn/in_proj``
<-> ``transformer.resblocks.3.attn.in_proj_weight``), see ``convert.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.nets.ldm_unet import LayerNorm

Array = jax.Array

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP's architecture; the field names are those of ``clip.model.CLIP``."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    activation: str = "quick_gelu"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"CLIP activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"CLIP image_resolution {self.image_resolution} is not a multiple of the patch "
                f"size {self.vision_patch_size}"
            )

    @classmethod
    def openai(cls, **kwargs: Any) -> CLIPConfig:
        """``clip.model.CLIP(**kwargs)``: vision heads are ``vision_width // 64``, QuickGELU."""
        return cls(
            vision_heads=max(kwargs["vision_width"] // 64, 1), activation="quick_gelu", **kwargs
        )

    @classmethod
    def open_clip(
        cls, embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = False
    ) -> CLIPConfig:
        """``open_clip.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)`` for ViT towers."""
        width = vision_cfg["width"]
        return cls(
            embed_dim=embed_dim,
            image_resolution=vision_cfg["image_size"],
            vision_layers=vision_cfg["layers"],
            vision_width=width,
            vision_patch_size=vision_cfg["patch_size"],
            vision_heads=width // vision_cfg.get("head_width", 64),
            context_length=text_cfg.get("context_length", 77),
            vocab_size=text_cfg.get("vocab_size", 49408),
            transformer_width=text_cfg["width"],
            transformer_heads=text_cfg["heads"],
            transformer_layers=text_cfg["layers"],
            activation="quick_gelu" if quick_gelu else "gelu",
        )


def _vit(embed, res, layers, width, patch, heads, text_layers, text_width, text_heads, act):
    return CLIPConfig(
        embed, res, layers, width, patch, heads, 77, 49408, text_width, text_heads, text_layers, act
    )


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": _vit(512, 224, 12, 768, 32, 12, 12, 512, 8, "quick_gelu"),
    "ViT-B/16": _vit(512, 224, 12, 768, 16, 12, 12, 512, 8, "quick_gelu"),
    "ViT-L/14": _vit(768, 224, 24, 1024, 14, 16, 12, 768, 12, "quick_gelu"),
    "ViT-L/14@336px": _vit(768, 336, 24, 1024, 14, 16, 12, 768, 12, "quick_gelu"),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 16, 24, 1024, 16, "gelu"),
}


def preset(name: str) -> CLIPConfig:
    """A released CLIP's configuration by name (``ViT-B/16``, ``ViT-H-14``, ...)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown CLIP model {name!r}{hint}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def quick_gelu(x: Array) -> Array:
    """OpenAI's QuickGELU, ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


class Attention(nn.Module):
    """``nn.MultiheadAttention``: fused q|k|v projection (head-major), softmax in float32."""

    width: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x [B,T,W], additive mask [T,T] or None -> [B,T,W]."""
        b, t, w = x.shape
        hd = w // self.heads
        qkv = nn.Dense(3 * w, dtype=self.dtype, name="in_proj")(x)
        q, k, v = (
            a.reshape(b, t, self.heads, hd).astype(jnp.float32) for a in jnp.split(qkv, 3, axis=-1)
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if mask is not None:
            logits = logits + mask
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(w, dtype=self.dtype, name="out_proj")(
            out.reshape(b, t, w).astype(self.dtype)
        )


class Block(nn.Module):
    """``ResidualAttentionBlock``: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    width: int
    heads: int
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x [B,T,W] -> [B,T,W]."""
        act = (
            quick_gelu
            if self.activation == "quick_gelu"
            else (lambda a: jax.nn.gelu(a, approximate=False))
        )
        x = x + Attention(self.width, self.heads, self.dtype, name="attn")(
            LayerNorm(self.width, dtype=self.dtype, name="ln_1")(x), mask
        )
        h = LayerNorm(self.width, dtype=self.dtype, name="ln_2")(x)
        h = nn.Dense(4 * self.width, dtype=self.dtype, name="c_fc")(h)
        return x + nn.Dense(self.width, dtype=self.dtype, name="c_proj")(act(h))


class Transformer(nn.Module):
    """A stack of blocks; ``__call__`` returns the residual stream after every block."""

    width: int
    layers: int
    heads: int
    activation: str
    dtype: Any = jnp.float32

    def setup(self):
        self.resblocks = [
            Block(self.width, self.heads, self.activation, self.dtype, name=f"resblocks_{i}")
            for i in range(self.layers)
        ]

    def __call__(self, x: Array, mask: Array | None, stop: int | None = None) -> list[Array]:
        """[x, after block 0, ..., after block stop-1] (all blocks when stop is None)."""
        states = [x]
        for block in self.resblocks[: self.layers if stop is None else stop]:
            states.append(block(states[-1], mask))
        return states


def causal_mask(n: int) -> Array:
    """Additive causal mask: -inf above the diagonal."""
    return jnp.triu(jnp.full((n, n), -jnp.inf, jnp.float32), k=1)


class TextTower(nn.Module):
    """CLIP's text transformer; its params are the non-``visual.`` entries of the state_dict."""

    width: int
    heads: int
    layers: int
    activation: str
    embed_dim: int = 0  # 0: no text_projection (a text encoder alone, e.g. Hugging Face's)
    context_length: int = 77
    vocab_size: int = 49408
    dtype: Any = jnp.float32

    def setup(self):
        self.token_embedding = nn.Embed(self.vocab_size, self.width, name="token_embedding")
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
        )
        self.transformer = Transformer(
            self.width, self.layers, self.heads, self.activation, self.dtype
        )
        self.ln_final = LayerNorm(self.width, dtype=self.dtype)
        if self.embed_dim:
            self.text_projection = self.param(
                "text_projection",
                nn.initializers.normal(self.width**-0.5),
                (self.width, self.embed_dim),
            )

    def layers_out(self, tokens: Array, stop: int | None = None) -> list[Array]:
        """Residual streams [embeddings, after block 0, ...]: each [B, T, width]."""
        x = self.token_embedding(tokens).astype(self.dtype) + self.positional_embedding.astype(
            self.dtype
        )
        return self.transformer(x, causal_mask(tokens.shape[1]), stop)

    def hidden(self, tokens: Array, layer: int = -1, final_ln: bool = True) -> Array:
        """Hidden states after ``layer`` blocks (negative counts from the end: -1 all, -2 the
        penultimate as Stable Diffusion 2), through ``ln_final`` when ``final_ln``: [B, T, width]."""
        stop = self.layers + 1 + layer if layer < 0 else layer
        if not 0 <= stop <= self.layers:
            raise ValueError(f"text layer {layer} is out of range for {self.layers} layers")
        x = self.layers_out(tokens, stop)[-1]
        return self.ln_final(x) if final_ln else x

    def __call__(self, tokens: Array) -> Array:
        """encode_text: ``ln_final`` states at the first end-of-text token, projected: [B, embed_dim]."""
        x = self.hidden(tokens)
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        return pooled @ self.text_projection.astype(self.dtype) if self.embed_dim else pooled


class VisionTower(nn.Module):
    """CLIP's ViT image tower; params are the ``visual.`` entries of the state_dict."""

    width: int
    heads: int
    layers: int
    patch: int
    resolution: int
    activation: str
    embed_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        grid = self.resolution // self.patch
        std = self.width**-0.5
        self.conv1 = nn.Conv(
            self.width,
            (self.patch, self.patch),
            strides=self.patch,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
        )
        self.class_embedding = self.param(
            "class_embedding", nn.initializers.normal(std), (self.width,)
        )
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(std), (grid * grid + 1, self.width)
        )
        self.ln_pre = LayerNorm(self.width, dtype=self.dtype)
        self.transformer = Transformer(
            self.width, self.layers, self.heads, self.activation, self.dtype
        )
        self.ln_post = LayerNorm(self.width, dtype=self.dtype)
        self.proj = self.param("proj", nn.initializers.normal(std), (self.width, self.embed_dim))

    def layers_out(self, images: Array) -> list[Array]:
        """[ln_pre output, after block 0, ...] for NHWC normalised images: each [B, 1 + grid^2, width]."""
        x = self.conv1(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding.astype(self.dtype)
        return self.transformer(self.ln_pre(x), None)

    def pooled(self, images: Array) -> Array:
        """``ln_post`` of the class token: [B, width]."""
        return self.ln_post(self.layers_out(images)[-1][:, 0])

    def __call__(self, images: Array) -> Array:
        """encode_image: [B, embed_dim]."""
        return self.pooled(images) @ self.proj.astype(self.dtype)


class CLIP(nn.Module):
    """CLIP: ``encode_image`` (NHWC, CLIP-normalised), ``encode_text`` (token ids), logits."""

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.visual = VisionTower(
            c.vision_width,
            c.vision_heads,
            c.vision_layers,
            c.vision_patch_size,
            c.image_resolution,
            c.activation,
            c.embed_dim,
            self.dtype,
        )
        self.text = text_tower(c, self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ()
        )

    def encode_image(self, images: Array) -> Array:
        """[B, H, W, 3] normalised -> [B, embed_dim]."""
        return self.visual(images)

    def encode_text(self, tokens: Array) -> Array:
        """[B, T] ids -> [B, embed_dim]."""
        return self.text(tokens)

    def text_hidden(self, tokens: Array, layer: int = -1, final_ln: bool = True) -> Array:
        """Text hidden states by layer (see ``TextTower.hidden``)."""
        return self.text.hidden(tokens, layer, final_ln)

    def __call__(self, images: Array, tokens: Array) -> tuple[Array, Array]:
        """(logits_per_image [N, B], logits_per_text [B, N])."""
        img, txt = l2_normalize(self.encode_image(images)), l2_normalize(self.encode_text(tokens))
        logits = jnp.exp(self.logit_scale) * img @ txt.T
        return logits, logits.T


def text_tower(config: CLIPConfig, dtype: Any = jnp.float32, projection: bool = True) -> TextTower:
    """The text tower of ``config`` alone (the Stable Diffusion text encoders)."""
    c = config
    return TextTower(
        c.transformer_width,
        c.transformer_heads,
        c.transformer_layers,
        c.activation,
        c.embed_dim if projection else 0,
        c.context_length,
        c.vocab_size,
        dtype,
        name="text",
    )


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """``F.normalize``: x / max(|x|, 1e-12), with a gradient that is finite at 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return x / jnp.maximum(jnp.where(sq > 0, norm, 0.0), 1e-12)


def normalize_images(images: Array) -> Array:
    """[0, 1] NHWC -> CLIP's normalisation."""
    return (images - jnp.asarray(MEAN, images.dtype)) / jnp.asarray(STD, images.dtype)


def param_shapes(config: CLIPConfig) -> dict:
    """The parameter tree's shapes, traced without allocating (full-size presets included)."""
    model = CLIP(config)
    r = config.image_resolution
    images = jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def num_params(config: CLIPConfig) -> int:
    """Total parameter count of ``config``."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(param_shapes(config))))


def encode_image(params: Any, config: CLIPConfig, images: Array, dtype: Any = jnp.float32) -> Array:
    """``CLIP(config).encode_image`` with ``params``: [B, H, W, 3] normalised -> [B, embed_dim]."""
    out = CLIP(config, dtype).apply({"params": params}, images, method="encode_image")
    return jnp.asarray(out, jnp.float32)


def encode_text(params: Any, config: CLIPConfig, tokens: Array, dtype: Any = jnp.float32) -> Array:
    """``CLIP(config).encode_text`` with ``params``: [B, T] ids -> [B, embed_dim]."""
    out = CLIP(config, dtype).apply({"params": params}, tokens, method="encode_text")
    return jnp.asarray(out, jnp.float32)
