"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, Fig. 21) and its logvar head, NHWC.

Layer for layer as NVlabs/edm2 ``training/networks_edm2.py``: no biases, weights normalised
in the forward pass (eq. 47) and by ``forced_normalize`` between steps (eq. 66), mp_silu,
mp_sum, mp_cat, Fourier features from loaded buffers, pixel norm in encoder blocks, the
constant ones channel, per-head normalised q/k/v, activations clipped to +-clip_act.
Parameters are nested as the reference state_dict (``unet/enc/16x16_conv/weight``) with
MPConv weights kept in torch layout [out, in, kh, kw] / [out, in], so conversion is a rename.
The preconditioning is EDM's (``EDMPrecond``); ``logvar`` is the uncertainty u(sigma).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax import hashrng
from edm_jax.nets.conditioning import one_hot_labels
from edm_jax.nets.layers import downsample, upsample
from edm_jax.nets.song_unet import check_levels

Array = jax.Array


def normalize(x: Array, axis=None, eps: float = 1e-4) -> Array:
    """x / (eps + ||x|| / sqrt(n)) over `axis` (default: all but the first), n = elements reduced."""
    if axis is None:
        axis = tuple(range(1, x.ndim))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    xf = x.astype(jnp.float32)
    n = math.prod(x.shape[a] for a in axis)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=axis, keepdims=True))
    return x / (eps + norm / math.sqrt(n)).astype(x.dtype)


def mp_silu(x: Array) -> Array:
    """Magnitude-preserving SiLU (EDM2 eq. 81)."""
    return jax.nn.silu(x) / 0.596


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving sum lerp(a, b, t) / sqrt((1-t)^2 + t^2) (EDM2 eq. 88)."""
    return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving concatenation on channels (EDM2 eq. 103)."""
    Na, Nb = a.shape[-1], b.shape[-1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], -1)


def forced_normalize(params: Any) -> Any:
    """Forced weight normalisation (EDM2 eq. 66): every MPConv ``weight`` <- normalize(weight)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: normalize(v) if k[-1] == "weight" and v.ndim >= 2 else v for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features cos(x f + phi) sqrt(2) (EDM2 eq. 75); f, phi buffers."""

    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B] -> float32 [B, num_channels]."""
        shape = (self.num_channels,)
        freqs = self.param(
            "freqs", lambda k: 2 * np.pi * self.bandwidth * jax.random.normal(k, shape)
        )
        phases = self.param("phases", lambda k: 2 * np.pi * jax.random.uniform(k, shape))
        y = jnp.outer(x.astype(jnp.float32), freqs.astype(jnp.float32)) + phases
        return jnp.cos(y) * np.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel k) or linear (kernel 0): normalized weight, no bias."""

    in_channels: int
    out_channels: int
    kernel: int = 0

    @nn.compact
    def __call__(self, x: Array, gain: Array | float = 1.0) -> Array:
        """x [B,H,W,Cin] (or [B,Cin] for linear) -> [..., Cout] in x's dtype."""
        k = (self.kernel, self.kernel) if self.kernel else ()
        shape = (self.out_channels, self.in_channels, *k)
        w = self.param("weight", lambda key: jax.random.normal(key, shape))
        w = normalize(w.astype(jnp.float32))  # traditional weight normalisation
        w = (w * (gain / np.sqrt(math.prod(shape[1:])))).astype(x.dtype)
        if not self.kernel:
            return x @ w.T
        p = self.kernel // 2
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "OIHW", "NHWC")
        )


def mp_attention(qkv: Array, heads: int) -> Array:
    """Self-attention over pixels with per-head normalised q, k, v in edm2's interleaved layout."""
    B, H, W, C3 = qkv.shape
    y = qkv.reshape(B, H * W, heads, C3 // (3 * heads), 3)  # channel 3i+j = component j of i
    y = normalize(y, axis=3)
    q, k, v = y[..., 0], y[..., 1], y[..., 2]  # [B, HW, heads, c]
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k / np.sqrt(q.shape[-1]))
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhc->nqhc", w, v).reshape(B, H, W, C3 // 3)


class Block(nn.Module):
    """EDM2 encoder/decoder block with optional self-attention (Fig. 21)."""

    in_channels: int
    out_channels: int
    emb_channels: int
    flavor: str = "enc"
    resample_mode: str = "keep"
    resample_filter: tuple[float, ...] = (1, 1)
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0

    @property
    def heads(self) -> int:
        """Attention heads: out_channels // channels_per_head (0 = no attention)."""
        return self.out_channels // self.channels_per_head if self.attention else 0

    def _resample(self, x: Array) -> Array:
        pad = (len(self.resample_filter) - 1) // 2
        if self.resample_mode == "down":
            return downsample(x, self.resample_filter, pad)
        if self.resample_mode == "up":
            return upsample(x, self.resample_filter, pad)
        return x

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """x [B,H,W,Cin], emb [B,E] -> [B,H',W',Cout]."""
        cin, cout = self.in_channels, self.out_channels
        x = self._resample(x)
        if self.flavor == "enc":
            if cin != cout:
                x = MPConv(cin, cout, 1, name="conv_skip")(x)
            x = normalize(x, axis=-1)  # pixel norm
        emb_gain = self.param("emb_gain", nn.initializers.zeros, ())
        y = MPConv(cout if self.flavor == "enc" else cin, cout, 3, name="conv_res0")(mp_silu(x))
        c = MPConv(self.emb_channels, cout, 0, name="emb_linear")(emb, gain=emb_gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        if train and self.dropout:
            y = hashrng.dropout(self.make_rng("dropout"), y, self.dropout)
        y = MPConv(cout, cout, 3, name="conv_res1")(y)
        if self.flavor == "dec" and cin != cout:
            x = MPConv(cin, cout, 1, name="conv_skip")(x)
        x = mp_sum(x, y, self.res_balance)
        if self.heads:
            qkv = MPConv(cout, cout * 3, 1, name="attn_qkv")(x)
            y = MPConv(cout, cout, 1, name="attn_proj")(mp_attention(qkv, self.heads))
            x = mp_sum(x, y, self.attn_balance)
        if self.clip_act is not None:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        return x


class BlockSpec(NamedTuple):
    """One Block of the plan: reference name, channels, flavor, resampling, attention."""

    name: str
    cin: int
    cout: int
    flavor: str
    resample_mode: str = "keep"
    attention: bool = False


def edm2_plan(net: EDM2UNet) -> tuple[int, tuple, tuple]:
    """(first conv's out channels, encoder Blocks, decoder Blocks) in the reference's order."""
    cblock = [net.model_channels * m for m in net.channel_mult]
    enc: list[BlockSpec] = []
    cout = cblock[0]
    for level, channels in enumerate(cblock):
        res = net.img_resolution >> level
        if level > 0:
            enc.append(BlockSpec(f"{res}x{res}_down", cout, cout, "enc", "down"))
        for idx in range(net.num_blocks):
            attn = res in net.attn_resolutions
            enc.append(BlockSpec(f"{res}x{res}_block{idx}", cout, channels, "enc", attention=attn))
            cout = channels
    skips = [cblock[0]] + [b.cout for b in enc]
    dec: list[BlockSpec] = []
    for level, channels in reversed(list(enumerate(cblock))):
        res = net.img_resolution >> level
        if level == len(cblock) - 1:
            dec.append(BlockSpec(f"{res}x{res}_in0", cout, cout, "dec", attention=True))
            dec.append(BlockSpec(f"{res}x{res}_in1", cout, cout, "dec"))
        else:
            dec.append(BlockSpec(f"{res}x{res}_up", cout, cout, "dec", "up"))
        for idx in range(net.num_blocks + 1):
            attn = res in net.attn_resolutions
            cin, cout = cout + skips.pop(), channels
            dec.append(BlockSpec(f"{res}x{res}_block{idx}", cin, cout, "dec", attention=attn))
    return cblock[0], tuple(enc), tuple(dec)


def _block(s: BlockSpec, kw: dict) -> Block:
    """The Block of plan entry `s` (named as the reference's state_dict prefix)."""
    return Block(
        s.cin, s.cout, flavor=s.flavor, resample_mode=s.resample_mode, attention=s.attention,
        name=s.name, **kw,
    )  # fmt: skip


class _Stack(nn.Module):
    """The encoder ('enc') or decoder ('dec') ModuleDict of the reference."""

    specs: tuple
    block_kwargs: tuple  # (name, value) pairs shared by every Block
    in_channels: int = 0  # encoder: image channels + 1 (the ones channel)
    conv_channels: int = 0  # encoder: the first conv's output channels
    concat_balance: float = 0.5

    @nn.compact
    def __call__(self, x: Array, emb: Array, skips: list | None = None, train: bool = False):
        """Encoder: x -> list of skips. Decoder: (x, skips) -> x."""
        kw = dict(self.block_kwargs)
        if skips is None:  # encoder
            res = x.shape[1]
            x = MPConv(self.in_channels, self.conv_channels, 3, name=f"{res}x{res}_conv")(x)
            out = [x]
            for s in self.specs:
                x = _block(s, kw)(x, emb, train)
                out.append(x)
            return out
        for s in self.specs:
            if "block" in s.name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = _block(s, kw)(x, emb, train)
        return x


class _UNet(nn.Module):
    """The reference ``UNet``: embedding, encoder, decoder, out_conv (parameters under 'unet')."""

    arch: Any  # the EDM2UNet whose fields describe the network (read only)

    def _embedding(self, noise_labels: Array, class_labels, train: bool) -> Array:
        a = self.arch
        cblock = [a.model_channels * m for m in a.channel_mult]
        cnoise = a.model_channels * a.channel_mult_noise if a.channel_mult_noise else cblock[0]
        cemb = a.model_channels * a.channel_mult_emb if a.channel_mult_emb else max(cblock)
        emb = MPFourier(cnoise, name="emb_fourier")(noise_labels)
        emb = MPConv(cnoise, cemb, 0, name="emb_noise")(emb)
        if a.label_dim:
            B = noise_labels.shape[0]
            if class_labels is None:  # the reference's zeros [1, label_dim]
                onehot = jnp.zeros((B, a.label_dim), jnp.float32)
            else:
                onehot = one_hot_labels(class_labels, a.label_dim)
            if train and a.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (B, 1)) >= a.label_dropout
                onehot = onehot * keep
            y = MPConv(a.label_dim, cemb, 0, name="emb_label")(onehot * np.sqrt(a.label_dim))
            emb = mp_sum(emb, y, t=a.label_balance)
        return mp_silu(emb)

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, class_labels, train: bool = False) -> Array:
        """F(x; c_noise, labels): x [B,H,W,C] -> [B,H,W,out_channels]."""
        a = self.arch
        emb = self._embedding(noise_labels, class_labels, train).astype(a.dtype)
        x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1).astype(a.dtype)
        conv_ch, enc, dec = edm2_plan(a)
        kw = (
            ("emb_channels", emb.shape[-1]),
            ("resample_filter", tuple(a.resample_filter)),
            ("channels_per_head", a.channels_per_head),
            ("dropout", a.dropout),
            ("res_balance", a.res_balance),
            ("attn_balance", a.attn_balance),
            ("clip_act", a.clip_act),
        )
        skips = _Stack(enc, kw, a.in_channels + 1, conv_ch, name="enc")(x, emb, train=train)
        x = _Stack(dec, kw, concat_balance=a.concat_balance, name="dec")(
            x=skips[-1], emb=emb, skips=skips, train=train
        )
        out_gain = self.param("out_gain", nn.initializers.zeros, ())
        return MPConv(x.shape[-1], a.out_channels, 3, name="out_conv")(x, gain=out_gain)


@dataclasses.dataclass(frozen=True)
class EDM2Arch:
    """The architecture fields of an EDM2UNet, as a plain value handed to its inner modules."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int
    model_channels: int
    channel_mult: tuple[int, ...]
    channel_mult_noise: int | None
    channel_mult_emb: int | None
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    label_balance: float
    concat_balance: float
    channels_per_head: int
    dropout: float
    label_dropout: float
    res_balance: float
    attn_balance: float
    clip_act: float | None
    resample_filter: tuple[float, ...]
    dtype: Any


class EDM2UNet(nn.Module):
    """EDM2 ``Precond``'s networks: the magnitude-preserving U-Net and the logvar head.

    Defaults are the reference's (edm2-img512-s at model_channels 192). ``__call__`` is the raw
    F(x; c_noise, labels); ``logvar(c_noise)`` is the uncertainty u(sigma) [B].
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    dropout: float = 0.0
    label_dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    resample_filter: tuple[float, ...] = (1, 1)
    logvar_channels: int = 128
    dtype: Any = jnp.float32

    state_dict_prefix = ""  # parameter names are the reference Precond's state_dict names

    @staticmethod
    def prepare_params(params: Any) -> Any:
        """The parameters a training step uses: forced weight normalisation (eq. 66)."""
        return forced_normalize(params)

    def __post_init__(self):
        if self.augment_dim:
            raise ValueError(
                f"EDM2UNet has no augmentation labels; got augment_dim {self.augment_dim}"
            )
        if len(self.resample_filter) % 2:
            raise ValueError(f"resample_filter must have even length; got {self.resample_filter}")
        check_levels(self.img_resolution, self.channel_mult)
        super().__post_init__()

    def arch(self) -> EDM2Arch:
        """This network's architecture fields as a plain dataclass."""
        names = [f.name for f in dataclasses.fields(EDM2Arch)]
        return EDM2Arch(**{k: getattr(self, k) for k in names})

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """No derived buffers: the Fourier freqs/phases are loaded with the parameters."""
        return {}

    def setup(self):
        self.unet = _UNet(self.arch())
        self.logvar_fourier = MPFourier(self.logvar_channels)
        self.logvar_linear = MPConv(self.logvar_channels, 1, 0)

    def logvar(self, noise_labels: Array) -> Array:
        """u(sigma) of the preconditioner: logvar_linear(logvar_fourier(c_noise)), float32 [B]."""
        return self.logvar_linear(self.logvar_fourier(noise_labels))[:, 0].astype(jnp.float32)

    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        """F(x; c_noise, labels): x [B,H,W,in_channels] -> [B,H,W,out_channels] in dtype."""
        if self.is_initializing():
            self.logvar(noise_labels)  # create the logvar head's parameters too
        return self.unet(x, noise_labels, class_labels, train)


def edm2_logvar(model, params: Any, sigma: Array) -> Array:
    """u(sigma) [B] of an EDM2 DiffusionModel (c_noise = ln(sigma) / 4), float32."""
    if not isinstance(model.net, EDM2UNet):
        raise ValueError(f"logvar needs an EDM2 model; got {type(model.net).__name__}")
    c_noise = jnp.log(jnp.asarray(sigma, jnp.float32).reshape(-1)) / 4
    return model.net.apply({"params": params}, c_noise, method="logvar")  # type: ignore[return-value]
