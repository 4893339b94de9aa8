"""DDPM++ / NCSN++ U-Net of Song et al. 2021 as NVlabs/edm ``SongUNet``, NHWC, in Flax.

The layer list is computed once in plain Python (``song_unet_plan``), in the reference's
order and with its names, so the forward pass, the parameter names and the state_dict
conversion all follow the same plan.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.checks import check_choice
from edm_jax.nets.conditioning import NULL_LABELS, song_label_map
from edm_jax.nets.layers import (
    ATTENTION_IMPLS,
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Init,
    Linear,
    UNetBlock,
    positional_embedding,
    resample_kernel,
)

Array = jax.Array

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")

INIT = Init("xavier_uniform")
INIT_ZERO = Init("xavier_uniform", weight=1e-5)
INIT_ATTN = Init("xavier_uniform", weight=math.sqrt(0.2))


class Spec(NamedTuple):
    """One entry of the U-Net plan: reference name, kind of layer and its constructor kwargs."""

    name: str
    kind: str
    kwargs: dict


def check_levels(img_resolution: int, channel_mult: tuple[int, ...]) -> None:
    """The resolution must halve evenly at each of the len(channel_mult) - 1 downsamplings."""
    if not channel_mult:
        raise ValueError("channel_mult must name at least one level")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(
            f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
            f"(channel_mult {tuple(channel_mult)})"
        )


def spec(kind: str, name: str, cin: int, cout: int, **kwargs) -> Spec:
    """A plan entry with in/out channels (num_channels for a GroupNorm)."""
    if kind == "aux_norm":
        return Spec(name, kind, dict(num_channels=cin, **kwargs))
    return Spec(name, kind, dict(in_channels=cin, out_channels=cout, **kwargs))


def _block_kwargs(net: SongUNet) -> dict:
    """UNetBlock options shared by every SongUNet block (DDPM++/NCSN++ settings)."""
    return dict(
        emb_channels=net.model_channels * net.channel_mult_emb,
        num_heads=1,
        dropout=net.dropout,
        attn_impl=net.attn_impl,
        skip_scale=math.sqrt(0.5),
        eps=1e-6,
        resample_filter=tuple(net.resample_filter),
        resample_proj=True,
        adaptive_scale=False,
        winit=INIT,
        winit_zero=INIT_ZERO,
        winit_attn=INIT_ATTN,
    )


def song_unet_plan(net: SongUNet) -> tuple[list[Spec], list[Spec]]:
    """Encoder and decoder layer lists of SongUNet, in the reference's order."""
    block, rs = _block_kwargs(net), dict(resample_filter=tuple(net.resample_filter))
    enc, cout, caux = [], net.in_channels, net.in_channels
    for level, mult in enumerate(net.channel_mult):
        r = f"{net.img_resolution >> level}x{net.img_resolution >> level}"
        if level == 0:
            cout = net.model_channels
            enc.append(spec("conv", f"{r}_conv", net.in_channels, cout, kernel=3, winit=INIT))
        else:
            enc.append(spec("block", f"{r}_down", cout, cout, down=True, **block))
            if net.encoder_type == "skip":
                enc.append(spec("aux_down", f"{r}_aux_down", caux, caux, kernel=0, down=True, **rs))
                enc.append(spec("aux_skip", f"{r}_aux_skip", caux, cout, kernel=1, winit=INIT))
            if net.encoder_type == "residual":
                kw = dict(kernel=3, down=True, fused_resample=True, winit=INIT, **rs)
                enc.append(spec("aux_residual", f"{r}_aux_residual", caux, cout, **kw))
                caux = cout
        for idx in range(net.num_blocks):
            attn = (net.img_resolution >> level) in net.attn_resolutions
            cin, cout = cout, net.model_channels * mult
            enc.append(spec("block", f"{r}_block{idx}", cin, cout, attention=attn, **block))
    skips = [s.kwargs["out_channels"] for s in enc if "aux" not in s.name]
    return enc, _decoder_plan(net, block, rs, cout, skips)


def _decoder_plan(net: SongUNet, block: dict, rs: dict, cout: int, skips: list[int]) -> list[Spec]:
    """Decoder half of song_unet_plan (consumes the encoder's skip channel counts)."""
    dec, last, out = [], len(net.channel_mult) - 1, net.out_channels
    for level, mult in reversed(list(enumerate(net.channel_mult))):
        res = net.img_resolution >> level
        r = f"{res}x{res}"
        if level == last:
            dec.append(spec("block", f"{r}_in0", cout, cout, attention=True, **block))
            dec.append(spec("block", f"{r}_in1", cout, cout, **block))
        else:
            dec.append(spec("block", f"{r}_up", cout, cout, up=True, **block))
        for idx in range(net.num_blocks + 1):
            cin, cout = cout + skips.pop(), net.model_channels * mult
            attn = idx == net.num_blocks and res in net.attn_resolutions
            dec.append(spec("skip_block", f"{r}_block{idx}", cin, cout, attention=attn, **block))
        if net.decoder_type == "skip" or level == 0:
            if net.decoder_type == "skip" and level < last:
                dec.append(spec("aux_up", f"{r}_aux_up", out, out, kernel=0, up=True, **rs))
            dec.append(spec("aux_norm", f"{r}_aux_norm", cout, cout, eps=1e-6))
            dec.append(spec("aux_conv", f"{r}_aux_conv", cout, out, kernel=3, winit=INIT_ZERO))
    return dec


def plan_buffers(enc: list[Spec], dec: list[Spec]) -> dict[str, np.ndarray]:
    """Reference resample_filter buffers, name -> float32 [1, 1, k, k], for a U-Net plan."""
    out = {}
    for prefix, plan in (("enc", enc), ("dec", dec)):
        for s in plan:
            kw = s.kwargs
            if not (kw.get("up") or kw.get("down")):
                continue
            f = resample_kernel(kw.get("resample_filter", (1, 1)))[None, None]
            convs = ("conv0", "skip") if "block" in s.kind else ("",)
            for c in convs:
                out[".".join(p for p in (prefix, s.name, c, "resample_filter") if p)] = f
    return out


class SongUNet(nn.Module):
    """DDPM++ (positional/standard) and NCSN++ (fourier/residual) U-Net; defaults = reference's."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    null_label: str = "zero"
    attn_impl: str | None = None  # None/'xla' or 'cudnn' (fused GPU attention, bf16/fp16)
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[float, ...] = (1, 1)
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES)
        check_choice("encoder_type", self.encoder_type, ENCODER_TYPES)
        check_choice("decoder_type", self.decoder_type, DECODER_TYPES)
        check_choice("null_label", self.null_label, NULL_LABELS)
        check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        check_levels(self.img_resolution, self.channel_mult)
        super().__post_init__()

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """The reference state_dict's non-parameter buffers (resample filters) by name."""
        return plan_buffers(*song_unet_plan(self))

    def _embedding(self, noise_labels, class_labels, augment_labels, train) -> Array:
        """Mapping network: noise, class and augmentation labels -> emb float32 [B, E]."""
        B, nc = noise_labels.shape[0], self.model_channels * self.channel_mult_noise
        ec = self.model_channels * self.channel_mult_emb
        if self.embedding_type == "positional":
            emb = positional_embedding(noise_labels, nc, endpoint=True)
        else:
            emb = FourierEmbedding(nc, name="map_noise")(noise_labels)
        emb = emb.reshape(B, 2, -1)[:, ::-1].reshape(B, -1)  # swap to [sin, cos]
        if self.label_dim:
            map_label = song_label_map(self.label_dim, nc, self.label_dropout, self.null_label)
            emb = emb + map_label(class_labels, B, train)
        if self.augment_dim and augment_labels is not None:
            aug = Linear(self.augment_dim, nc, bias=False, winit=INIT, name="map_augment")
            emb = emb + aug(jnp.asarray(augment_labels, jnp.float32))
        emb = nn.silu(Linear(nc, ec, winit=INIT, name="map_layer0")(emb))
        return nn.silu(Linear(ec, ec, winit=INIT, name="map_layer1")(emb))

    def _layer(self, prefix: str, s: Spec) -> nn.Module:
        """The Flax module of plan entry s, named '<enc|dec>_<reference name>'."""
        name = f"{prefix}_{s.name}"
        if "block" in s.kind:
            return UNetBlock(**s.kwargs, dtype=self.dtype, name=name)
        if s.kind == "aux_norm":
            return GroupNorm(**s.kwargs, dtype=self.dtype, name=name)
        return Conv2d(**s.kwargs, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        """F(x; noise_labels): x [B,H,W,in_channels] -> [B,H,W,out_channels] in dtype."""
        emb = self._embedding(noise_labels, class_labels, augment_labels, train)
        enc, dec = song_unet_plan(self)
        x = x.astype(self.dtype)
        skips, aux = [], x
        for s in enc:
            layer = self._layer("enc", s)
            if s.kind == "aux_down":
                aux = layer(aux)
            elif s.kind == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif s.kind == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb, train) if s.kind == "block" else layer(x)
                skips.append(x)
        aux = tmp = None
        for s in dec:
            layer = self._layer("dec", s)
            if s.kind == "aux_up":
                aux = layer(aux)
            elif s.kind == "aux_norm":
                tmp = layer(x)
            elif s.kind == "aux_conv":
                tmp = layer(nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if s.kind == "skip_block":
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = layer(x, emb, train)
        return aux
