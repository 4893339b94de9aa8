"""CompVis / Stability latent-diffusion U-Net (``ldm/modules/diffusionmodules/openaimodel.py``).

The skeleton is guided-diffusion's (DhariwalUNet with GroupNorm32, no scale-shift, conv
resampling); the attention is a ``SpatialTransformer`` (``ldm/modules/attention.py``): GroupNorm
eps 1e-6, proj_in, BasicTransformerBlocks (self-attention, cross-attention to the text
context, GEGLU feed-forward), proj_out and the residual. Apply:
``net.apply({'params': p}, x [B,h,w,4], t [B] float, context [B,S,context_dim])`` -> [B,h,w,4].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax.nets.dhariwal_unet import DhariwalUNet
from edm_jax.nets.layers import GroupNorm, Linear, UNetBlock
from edm_jax.nets.song_unet import Spec

Array = jax.Array
Dtype = Any


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (torch nn.LayerNorm, eps 1e-5)."""

    dim: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., dim] -> normalised, scale * x + bias, in dtype."""
        scale = self.param("scale", nn.initializers.ones, (self.dim,))
        bias = self.param("bias", nn.initializers.zeros, (self.dim,))
        xf = x.astype(jnp.float32)
        d = xf - xf.mean(axis=-1, keepdims=True)
        y = d * jax.lax.rsqrt(jnp.square(d).mean(axis=-1, keepdims=True) + self.eps)
        return (y * scale + bias).astype(self.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of x to context (x itself when None); heads split as (h d)."""

    query_dim: int
    context_dim: int
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attn_impl: str | None = None  # 'cudnn': fused kernel in dtype (no float32 upcast)

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        """x [B,T,query_dim], context [B,S,context_dim] -> [B,T,query_dim]."""
        inner, h = self.heads * self.head_dim, self.heads
        ctx = x if context is None else context
        cdim = self.query_dim if context is None else self.context_dim
        kw = dict(bias=False, dtype=self.dtype)
        q = Linear(self.query_dim, inner, name="to_q", **kw)(x)
        k = Linear(cdim, inner, name="to_k", **kw)(ctx)
        v = Linear(cdim, inner, name="to_v", **kw)(ctx)
        split = lambda a: a.reshape(*a.shape[:2], h, self.head_dim)  # noqa: E731  (h d)
        # softmax(q k^T / sqrt(d)) v in float32 (ATTN_PRECISION, attention.py:180)
        if self.attn_impl == "cudnn":
            a = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="cudnn")
        else:
            f32 = lambda a: split(a).astype(jnp.float32)  # noqa: E731
            a = jax.nn.dot_product_attention(f32(q), f32(k), f32(v)).astype(self.dtype)
        a = a.reshape(*x.shape[:2], inner)
        return Linear(inner, self.query_dim, dtype=self.dtype, name="to_out")(a)


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward (pre-LN)."""

    dim: int
    heads: int
    head_dim: int
    context_dim: int
    dtype: Dtype = jnp.float32
    attn_impl: str | None = None  # 'cudnn': fused kernel in dtype (no float32 upcast)

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x [B,T,dim], context [B,S,context_dim] -> [B,T,dim]."""
        d, dt = self.dim, self.dtype
        attn = dict(heads=self.heads, head_dim=self.head_dim, dtype=dt, attn_impl=self.attn_impl)
        x = x + CrossAttention(d, d, **attn, name="attn1")(LayerNorm(d, dtype=dt, name="norm1")(x))
        x2 = LayerNorm(d, dtype=dt, name="norm2")(x)
        x = x + CrossAttention(d, self.context_dim, **attn, name="attn2")(x2, context)
        h = Linear(d, 8 * d, dtype=dt, name="ff_in")(LayerNorm(d, dtype=dt, name="norm3")(x))
        value, gate = jnp.split(h, 2, axis=-1)  # GEGLU: first half is the value (attention.py:44)
        h = value * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(dt)
        return x + Linear(4 * d, d, dtype=dt, name="ff_out")(h)


class SpatialTransformer(nn.Module):
    """GroupNorm(32, eps 1e-6), proj_in, transformer blocks over h*w tokens, proj_out, residual.

    proj_in/proj_out are pointwise, so SD1's 1x1 convs and SD2's Linears are the same Linear
    here (the converter reshapes the kernels).
    """

    channels: int
    heads: int
    head_dim: int
    depth: int
    context_dim: int
    dtype: Dtype = jnp.float32
    attn_impl: str | None = None  # 'cudnn': fused kernel in dtype (no float32 upcast)

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x [B,H,W,C], context [B,S,context_dim] -> [B,H,W,C]."""
        B, H, W, C = x.shape
        inner, dt = self.heads * self.head_dim, self.dtype
        h = GroupNorm(C, min_channels_per_group=1, eps=1e-6, dtype=dt, name="norm")(x)
        h = Linear(C, inner, dtype=dt, name="proj_in")(h.reshape(B, H * W, C))  # (h w) tokens
        context = context.astype(dt)
        for i in range(self.depth):
            blk = TransformerBlock(
                inner,
                self.heads,
                self.head_dim,
                self.context_dim,
                dt,
                self.attn_impl,
                name=f"block{i}",
            )
            h = blk(h, context)
        return x + Linear(inner, C, dtype=dt, name="proj_out")(h).reshape(B, H, W, C)


class LDMUNet(DhariwalUNet):
    """Latent-diffusion UNetModel with SpatialTransformers; build it with ``ldm_unet(...)``."""

    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False  # SD2: Linear proj_in/out (conv 1x1 in SD1)

    def _block(self, name: str, s: Spec, x: Array, emb: Array, train: bool, **cond) -> Array:
        """ResBlock, then a SpatialTransformer where the plan asks for attention."""
        kw = dict(s.kwargs)
        attention = kw.pop("attention", False)
        x = UNetBlock(**kw, attention=False, dtype=self.dtype, name=name)(x, emb, train)
        if not attention:
            return x
        C = kw["out_channels"]
        heads = kw["num_heads"] or C // kw["channels_per_head"]
        st = SpatialTransformer(
            C,
            heads,
            C // heads,
            self.transformer_depth,
            self.context_dim,
            self.dtype,
            self.attn_impl,
            name=f"{name}_attn",
        )
        return st(x, cond["context"])

    @nn.compact
    def __call__(self, x, noise_labels, context=None, *, train=False):
        """eps or v of x [B,h,w,in] at timesteps [B] (float) given context [B,S,context_dim]."""
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            shape = None if context is None else context.shape
            raise ValueError(f"context must be [B, S, {self.context_dim}]; got {shape}")
        emb = self._embedding(noise_labels, None, None, train)
        return self._unet(x, emb, train, context=context)


def init_ldm_unet(net: LDMUNet, rng: Array) -> dict:
    """Float32 parameters of an LDMUNet (batch-1 dummy latents, one context token)."""
    r, c = net.img_resolution, net.in_channels
    x, t = jnp.zeros((1, r, r, c)), jnp.zeros((1,))
    return net.init({"params": rng}, x, t, jnp.zeros((1, 1, net.context_dim)))["params"]


def ldm_unet(
    image_size: int,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    attention_resolutions: tuple[int, ...],
    num_res_blocks: int,
    channel_mult: tuple[int, ...] = (1, 2, 4, 8),
    num_heads: int = -1,
    num_head_channels: int = -1,
    context_dim: int = 768,
    transformer_depth: int = 1,
    use_linear_in_transformer: bool = False,
    use_spatial_transformer: bool = True,
    legacy: bool = False,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
    **ignored: Any,
) -> LDMUNet:
    """The U-Net of a CompVis/Stability yaml's ``unet_config.params`` (use_checkpoint etc. ignored).

    attention_resolutions are downsample rates, as the yaml; image_size only names the layers.
    """
    unknown = set(ignored) - {"use_checkpoint", "use_fp16", "num_heads_upsample"}
    bad = sorted(unknown) + ["use_spatial_transformer=False"] * (not use_spatial_transformer)
    if bad or legacy:
        bad += ["legacy=True"] * legacy
        raise ValueError(f"unsupported latent-diffusion U-Net option(s): {bad}")
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError(
            f"set exactly one of num_heads ({num_heads}) and num_head_channels ({num_head_channels})"
        )
    return LDMUNet(
        img_resolution=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_blocks=num_res_blocks,
        attn_resolutions=tuple(image_size // ds for ds in attention_resolutions),
        dropout=dropout,
        adaptive_scale=False,
        resblock_updown=False,
        min_channels_per_group=1,
        num_heads=None if num_heads == -1 else num_heads,
        channels_per_head=64 if num_head_channels == -1 else num_head_channels,
        context_dim=context_dim,
        transformer_depth=transformer_depth,
        use_linear_in_transformer=use_linear_in_transformer,
        dtype=dtype,
    )


# Released Stable Diffusion U-Nets: the yamls' model.params.unet_config.params.
_SD = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2, 1),
    num_res_blocks=2,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=1,
)
SD_UNETS: dict[str, dict[str, Any]] = {
    "sd15": dict(_SD, num_heads=8, context_dim=768),  # v1-inference.yaml
    "sd21_v": dict(_SD, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    "sd2_base": dict(_SD, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
}
# Output parameterisation of each (v2-inference-v.yaml: v; the others eps).
SD_PREDICTION: dict[str, str] = {"sd15": "eps", "sd21_v": "v", "sd2_base": "eps"}


def released_unet(name: str, dtype: Any = jnp.float32) -> LDMUNet:
    """The U-Net of a released Stable Diffusion configuration ('sd15', 'sd21_v', 'sd2_base')."""
    if name not in SD_UNETS:
        raise ValueError(f"unknown Stable Diffusion U-Net {name!r}; valid: {sorted(SD_UNETS)}")
    return ldm_unet(**SD_UNETS[name], dtype=dtype)
