"""ADM U-Net of Dhariwal & Nichol 2021 as NVlabs/edm ``DhariwalUNet``, NHWC, in Flax."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.checks import check_choice
from edm_jax.nets.conditioning import NULL_LABELS, dhariwal_label_map
from edm_jax.nets.layers import (
    ATTENTION_IMPLS,
    QKV_LAYOUTS,
    Conv2d,
    GroupNorm,
    Init,
    Linear,
    StridedConv2d,
    UNetBlock,
    positional_embedding,
)
from edm_jax.nets.song_unet import Spec, check_levels, plan_buffers, spec

Array = jax.Array

INIT = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
INIT_ZERO = Init("kaiming_uniform", weight=0.0, bias=0.0)


def level_channels(net: Any, mult: float) -> int:
    """Channels of a level: int(mult * model_channels) (guided-diffusion allows mult 0.5)."""
    return int(mult * net.model_channels)


def _block_options(net: Any) -> dict:
    """UNetBlock options shared by every block of the ADM / guided-diffusion U-Net."""
    return dict(
        emb_channels=net.model_channels * net.channel_mult_emb,
        num_heads=net.num_heads,
        channels_per_head=net.channels_per_head,
        dropout=net.dropout,
        adaptive_scale=net.adaptive_scale,
        min_channels_per_group=net.min_channels_per_group,
        qkv_layout=net.qkv_layout,
        attn_impl=net.attn_impl,
        winit=INIT,
        winit_zero=INIT_ZERO,
    )


def _resample(net: Any, r: str, c: int, up: bool, block: dict) -> Spec:
    """The level change: an up/down UNetBlock, or (resblock_updown=False) a conv resampler."""
    if net.resblock_updown:
        return spec("block", f"{r}_{'up' if up else 'down'}", c, c, up=up, down=not up, **block)
    if up:  # nearest x2 then conv3x3 (unet.py:45-78 Upsample)
        return spec("conv", f"{r}_up", c, c, kernel=3, up=True, winit=INIT)
    return spec("down_conv", f"{r}_down", c, c, winit=INIT)  # conv3x3 stride 2 (unet.py:81)


def dhariwal_unet_plan(net: Any) -> tuple[list[Spec], list[Spec]]:
    """Encoder and decoder layer lists of DhariwalUNet (or a net with its fields), in order."""
    block = _block_options(net)
    enc, cout = [], net.in_channels
    for level, mult in enumerate(net.channel_mult):
        res = net.img_resolution >> level
        r, attn = f"{res}x{res}", res in net.attn_resolutions
        if level == 0:
            cout = level_channels(net, mult)
            enc.append(spec("conv", f"{r}_conv", net.in_channels, cout, kernel=3, winit=INIT))
        else:
            enc.append(_resample(net, r, cout, False, block))
        for idx in range(net.num_blocks):
            cin, cout = cout, level_channels(net, mult)
            enc.append(spec("block", f"{r}_block{idx}", cin, cout, attention=attn, **block))
    skips = [s.kwargs["out_channels"] for s in enc]
    dec = []
    for level, mult in reversed(list(enumerate(net.channel_mult))):
        res = net.img_resolution >> level
        r, attn = f"{res}x{res}", res in net.attn_resolutions
        if level == len(net.channel_mult) - 1:
            dec.append(spec("block", f"{r}_in0", cout, cout, attention=True, **block))
            dec.append(spec("block", f"{r}_in1", cout, cout, **block))
        else:
            dec.append(_resample(net, r, cout, True, block))
        for idx in range(net.num_blocks + 1):
            cin, cout = cout + skips.pop(), level_channels(net, mult)
            dec.append(spec("skip_block", f"{r}_block{idx}", cin, cout, attention=attn, **block))
    return enc, dec


class DhariwalUNet(nn.Module):
    """ADM U-Net (adaptive group norm, multi-head attention); defaults = the reference's."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    null_label: str = "zero"
    attn_impl: str | None = None  # None/'xla' or 'cudnn' (fused GPU attention, bf16/fp16)
    dtype: Any = jnp.float32
    # guided-diffusion options (openai_unet.py builds them); the defaults are NVlabs' ADM.
    num_heads: int | None = None  # fixed head count; None: out_channels // channels_per_head
    channels_per_head: int = 64
    adaptive_scale: bool = True  # use_scale_shift_norm
    resblock_updown: bool = True  # False: conv3x3 stride-2 Downsample, nearest+conv Upsample
    min_channels_per_group: int = 4  # 1 = GroupNorm32 (always 32 groups)
    qkv_layout: str = "nvlabs"  # 'legacy' / 'new' = QKVAttentionLegacy / QKVAttention

    def __post_init__(self):
        check_choice("null_label", self.null_label, NULL_LABELS)
        check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        check_choice("qkv_layout", self.qkv_layout, QKV_LAYOUTS)
        check_levels(self.img_resolution, self.channel_mult)
        super().__post_init__()

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """The reference state_dict's non-parameter buffers (resample filters) by name."""
        return plan_buffers(*dhariwal_unet_plan(self))

    def _embedding(self, noise_labels, class_labels, augment_labels, train) -> Array:
        """Mapping network: noise, class and augmentation labels -> emb float32 [B, E]."""
        B, mc = noise_labels.shape[0], self.model_channels
        ec = mc * self.channel_mult_emb
        emb = positional_embedding(noise_labels, mc)  # [cos, sin]
        if self.augment_dim and augment_labels is not None:
            aug = Linear(self.augment_dim, mc, bias=False, winit=INIT_ZERO, name="map_augment")
            emb = emb + aug(jnp.asarray(augment_labels, jnp.float32))
        emb = nn.silu(Linear(mc, ec, winit=INIT, name="map_layer0")(emb))
        emb = Linear(ec, ec, winit=INIT, name="map_layer1")(emb)
        if self.label_dim:
            map_label = dhariwal_label_map(self.label_dim, ec, self.label_dropout, self.null_label)
            emb = emb + map_label(class_labels, B, train)
        return nn.silu(emb)

    def _layer(self, prefix: str, s: Spec, x: Array, emb: Array, train: bool, **cond) -> Array:
        """Apply one plan entry (conv, strided conv or UNetBlock) named f'{prefix}_{s.name}'."""
        name = f"{prefix}_{s.name}"
        if s.kind == "conv":
            return Conv2d(**s.kwargs, dtype=self.dtype, name=name)(x)
        if s.kind == "down_conv":
            return StridedConv2d(**s.kwargs, dtype=self.dtype, name=name)(x)
        return self._block(name, s, x, emb, train, **cond)

    def _block(self, name: str, s: Spec, x: Array, emb: Array, train: bool, **cond) -> Array:
        """A residual block (with its self-attention); LDMUNet replaces the attention."""
        return UNetBlock(**s.kwargs, dtype=self.dtype, name=name)(x, emb, train)

    def _unet(self, x: Array, emb: Array, train: bool, **cond) -> Array:
        """Encoder, decoder with skip concatenation, and the output GN-SiLU-conv."""
        enc, dec = dhariwal_unet_plan(self)
        x = x.astype(self.dtype)
        skips = []
        for s in enc:
            x = self._layer("enc", s, x, emb, train, **cond)
            skips.append(x)
        for s in dec:
            if s.kind == "skip_block":
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._layer("dec", s, x, emb, train, **cond)
        cout = dec[-1].kwargs["out_channels"]
        mcpg = self.min_channels_per_group
        x = GroupNorm(cout, min_channels_per_group=mcpg, dtype=self.dtype, name="out_norm")(x)
        out = Conv2d(cout, self.out_channels, 3, winit=INIT_ZERO, dtype=self.dtype, name="out_conv")
        return out(nn.silu(x))

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        """F(x; noise_labels): x [B,H,W,in_channels] -> [B,H,W,out_channels] in dtype."""
        emb = self._embedding(noise_labels, class_labels, augment_labels, train)
        return self._unet(x, emb, train)
