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
    Conv2d,
    GroupNorm,
    Init,
    Linear,
    UNetBlock,
    positional_embedding,
)
from edm_jax.nets.song_unet import Spec, check_levels, plan_buffers, spec

Array = jax.Array

INIT = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
INIT_ZERO = Init("kaiming_uniform", weight=0.0, bias=0.0)


def dhariwal_unet_plan(net: DhariwalUNet) -> tuple[list[Spec], list[Spec]]:
    """Encoder and decoder layer lists of DhariwalUNet, in the reference's order."""
    block = dict(
        emb_channels=net.model_channels * net.channel_mult_emb,
        channels_per_head=64,
        dropout=net.dropout,
        attn_impl=net.attn_impl,
        winit=INIT,
        winit_zero=INIT_ZERO,
    )
    enc, cout = [], net.in_channels
    for level, mult in enumerate(net.channel_mult):
        res = net.img_resolution >> level
        r, attn = f"{res}x{res}", res in net.attn_resolutions
        if level == 0:
            cout = net.model_channels * mult
            enc.append(spec("conv", f"{r}_conv", net.in_channels, cout, kernel=3, winit=INIT))
        else:
            enc.append(spec("block", f"{r}_down", cout, cout, down=True, **block))
        for idx in range(net.num_blocks):
            cin, cout = cout, net.model_channels * mult
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
            dec.append(spec("block", f"{r}_up", cout, cout, up=True, **block))
        for idx in range(net.num_blocks + 1):
            cin, cout = cout + skips.pop(), net.model_channels * mult
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
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    null_label: str = "zero"
    attn_impl: str | None = None  # None/'xla' or 'cudnn' (fused GPU attention, bf16/fp16)
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_choice("null_label", self.null_label, NULL_LABELS)
        check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
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

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        """F(x; noise_labels): x [B,H,W,in_channels] -> [B,H,W,out_channels] in dtype."""
        emb = self._embedding(noise_labels, class_labels, augment_labels, train)
        enc, dec = dhariwal_unet_plan(self)
        x = x.astype(self.dtype)
        skips = []
        for s in enc:
            if s.kind == "conv":
                x = Conv2d(**s.kwargs, dtype=self.dtype, name=f"enc_{s.name}")(x)
            else:
                x = UNetBlock(**s.kwargs, dtype=self.dtype, name=f"enc_{s.name}")(x, emb, train)
            skips.append(x)
        for s in dec:
            if s.kind == "skip_block":
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = UNetBlock(**s.kwargs, dtype=self.dtype, name=f"dec_{s.name}")(x, emb, train)
        cout = dec[-1].kwargs["out_channels"]
        x = GroupNorm(cout, dtype=self.dtype, name="out_norm")(x)
        out = Conv2d(cout, self.out_channels, 3, winit=INIT_ZERO, dtype=self.dtype, name="out_conv")
        return out(nn.silu(x))
