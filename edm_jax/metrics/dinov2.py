"""DINOv2 ViT (facebookresearch/dinov2 ``DinoVisionTransformer``) in Flax, CLS features.

The configuration ``dinov2_vitl14`` builds (EDM2's FD-DINOv2): patch 14, a 37x37 position grid
(img_size 518) + cls, LayerScale, qkv/proj/ffn biases, no registers, exact (erf) GELU,
LayerNorm eps 1e-6, attention scale head_dim**-0.5. The position embedding is interpolated as
torch's ``F.interpolate(bicubic, scale_factor=(g + 0.1)/37)`` in float32. The output is the cls
token after the final LayerNorm (raw, not L2-normalised). Parameter names map one-to-one onto
the torch state_dict (``blocks.<i>.attn.qkv.weight`` <-> ``blocks_<i>/attn/qkv/kernel``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax.metrics.preprocess import resize_separable, torch_bicubic_matrix

Array = jax.Array
Dtype = Any
LN_EPS = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class DinoConfig:
    """DinoVisionTransformer's constructor arguments that shape the network."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    interpolate_offset: float = 0.1

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )


DINOV2_PRESETS = {
    "dinov2_vits14": DinoConfig(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14": DinoConfig(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14": DinoConfig(embed_dim=1024, depth=24, num_heads=16),
}


def interpolate_pos_embed(pos_embed: Array, gh: int, gw: int, offset: float) -> Array:
    """pos_embed [1,1+M*M,D] -> [1,1+gh*gw,D] as dinov2's interpolate_pos_encoding (float32)."""
    pos_embed = pos_embed.astype(jnp.float32)
    M = round((pos_embed.shape[1] - 1) ** 0.5)
    if (gh, gw) == (M, M):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, M, M, -1)  # [1,M,M,D]
    my = torch_bicubic_matrix(M, (gh + offset) / M)
    mx = torch_bicubic_matrix(M, (gw + offset) / M)
    if (my.shape[0], mx.shape[0]) != (gh, gw):
        raise ValueError(f"pos_embed interpolation gave {my.shape[0]}x{mx.shape[0]}, not {gh}x{gw}")
    grid = resize_separable(grid, my, mx).reshape(1, gh * gw, -1)
    return jnp.concatenate([pos_embed[:, :1], grid], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv (q|k|v, head, head_dim) and output proj."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, N, D = x.shape
        hd = D // self.num_heads
        qkv = nn.Dense(3 * D, dtype=self.dtype, precision=_HIGHEST, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(B, N, 3, self.num_heads, hd), 2, 0)  # [B,N,H,hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k, precision=_HIGHEST)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v, precision=_HIGHEST).reshape(B, N, D)
        return nn.Dense(D, dtype=self.dtype, precision=_HIGHEST, name="proj")(out)


class LayerScale(nn.Module):
    """x * gamma (per channel)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", nn.initializers.constant(1.0), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.hidden, dtype=self.dtype, precision=_HIGHEST, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, precision=_HIGHEST, name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x))."""

    num_heads: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ln = lambda name: nn.LayerNorm(LN_EPS, dtype=self.dtype, use_fast_variance=False, name=name)  # noqa: E731
        x = x + LayerScale(name="ls1")(
            Attention(self.num_heads, self.dtype, name="attn")(ln("norm1")(x))
        )
        return x + LayerScale(name="ls2")(
            Mlp(self.mlp_hidden, self.dtype, name="mlp")(ln("norm2")(x))
        )


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone: x [B,H,W,3] (ImageNet-normalised) -> cls features [B,embed_dim].

    ``return_blocks`` also returns the cls token after each block, before the final norm.
    """

    config: DinoConfig = DinoConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, return_blocks: bool = False):
        cfg, D = self.config, self.config.embed_dim
        M = cfg.img_size // cfg.patch_size
        p = cfg.patch_size
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, D))
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + M * M, D))
        self.param("mask_token", nn.initializers.zeros, (1, D))  # unused at inference
        proj = nn.Conv(
            D, (p, p), p, "VALID", dtype=self.dtype, precision=_HIGHEST, name="patch_embed_proj"
        )
        t = proj(x.astype(self.dtype))  # [B,gh,gw,D]
        B, gh, gw, _ = t.shape
        t = t.reshape(B, gh * gw, D)
        t = jnp.concatenate([jnp.broadcast_to(cls_token.astype(t.dtype), (B, 1, D)), t], axis=1)
        t = t + interpolate_pos_embed(pos_embed, gh, gw, cfg.interpolate_offset).astype(t.dtype)
        hidden, cls_blocks = int(D * cfg.mlp_ratio), []
        for i in range(cfg.depth):
            t = Block(cfg.num_heads, hidden, self.dtype, name=f"blocks_{i}")(t)
            cls_blocks.append(t[:, 0].astype(jnp.float32))
        t = nn.LayerNorm(LN_EPS, dtype=self.dtype, use_fast_variance=False, name="norm")(t)
        features = t[:, 0].astype(jnp.float32)  # [B,D]
        return (features, jnp.stack(cls_blocks)) if return_blocks else features
