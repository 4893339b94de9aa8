"""Building blocks of the EDM networks (NVlabs/edm ``training/networks.py``), NHWC.

Every layer keeps its parameters in float32 (``param_dtype``) and computes in ``dtype``;
normalisation statistics and softmax run in float32 whatever ``dtype`` is.
Parameter names follow Flax (``kernel`` HWIO / [in, out], ``scale``, ``bias``) and map
one-to-one onto the reference state_dict in ``convert.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import hashrng

Array = jax.Array
Dtype = Any

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


@dataclasses.dataclass(frozen=True)
class Init:
    """Weight initialisation of the reference: mode, weight gain and bias gain."""

    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0

    def __post_init__(self):
        if self.mode not in INIT_MODES:
            raise ValueError(f"unknown init mode {self.mode!r}; valid: {list(INIT_MODES)}")


def weight_init(mode: str, fan_in: int, fan_out: int, gain: float):
    """Flax initializer drawing the reference's `weight_init(mode, fan_in, fan_out) * gain`."""

    def init(key, shape, dtype=jnp.float32):
        if mode == "xavier_uniform":
            w = math.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1, 1)
        elif mode == "xavier_normal":
            w = math.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
        elif mode == "kaiming_uniform":
            w = math.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1, 1)
        else:
            w = math.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
        return w * gain

    return init


def resample_kernel(resample_filter: tuple[float, ...]) -> np.ndarray:
    """The 2-D resampling filter f f^T / (sum f)^2, float32 [k, k]."""
    f = np.asarray(resample_filter, np.float64)
    return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise(x: Array, f: np.ndarray, *, pad: int, stride: int, dilation: int) -> Array:
    """The same [k, k] filter on every channel of x [B,H,W,C] (strided or input-dilated)."""
    C, k = x.shape[-1], f.shape[0]
    w = jnp.broadcast_to(jnp.asarray(f, x.dtype)[:, :, None, None], (k, k, 1, C))
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        lhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=C,
    )


def downsample(x: Array, resample_filter: tuple[float, ...], pad: int) -> Array:
    """Filter and keep every second pixel (torch conv2d with the filter, stride 2)."""
    if tuple(resample_filter) == (1, 1) and pad == 0:  # 2x2 box filter = average pooling
        B, H, W, C = x.shape
        return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    return _depthwise(x, resample_kernel(resample_filter), pad=pad, stride=2, dilation=1)


def upsample(x: Array, resample_filter: tuple[float, ...], pad: int) -> Array:
    """Transposed convolution with 4 x the filter, stride 2 (torch conv_transpose2d)."""
    if tuple(resample_filter) == (1, 1) and pad == 0:  # nearest-neighbour upsampling
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    f = resample_kernel(resample_filter) * 4  # symmetric, so no flip is needed
    return _depthwise(x, f, pad=f.shape[0] - 1 - pad, stride=1, dilation=2)


class Linear(nn.Module):
    """Fully-connected layer y = x W + b (reference ``Linear``)."""

    in_features: int
    out_features: int
    bias: bool = True
    winit: Init = Init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., in] -> [..., out] in self.dtype."""
        fans = (self.in_features, self.out_features)
        w_init = weight_init(self.winit.mode, *fans, self.winit.weight)
        w = self.param("kernel", w_init, fans, jnp.float32)
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
        if self.bias:
            b = self.param("bias", weight_init(self.winit.mode, *fans, self.winit.bias), fans[1:])
            y = y + b.astype(self.dtype)
        return y


class Conv2d(nn.Module):
    """Convolution with optional up/downsampling (reference ``Conv2d``); kernel 0 = resample only."""

    in_channels: int
    out_channels: int
    kernel: int
    bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple[float, ...] = (1, 1)
    fused_resample: bool = False
    winit: Init = Init()
    dtype: Dtype = jnp.float32

    def _weights(self) -> tuple[Array | None, Array | None]:
        """The kernel [k,k,in,out] and bias [out] cast to dtype (None where absent)."""
        k, cin, cout = self.kernel, self.in_channels, self.out_channels
        if not k:
            return None, None
        fans = (cin * k * k, cout * k * k)
        w = self.param(
            "kernel", weight_init(self.winit.mode, *fans, self.winit.weight), (k, k, cin, cout)
        )
        b = None
        if self.bias:
            b = self.param("bias", weight_init(self.winit.mode, *fans, self.winit.bias), (cout,))
            b = b.astype(self.dtype)
        return w.astype(self.dtype), b

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,in] -> [B,H',W',out], H' = 2H (up), H/2 (down) or H."""
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        x = x.astype(self.dtype)
        w, b = self._weights()
        w_pad = self.kernel // 2
        f_pad = (len(self.resample_filter) - 1) // 2 if (self.up or self.down) else 0
        if self.fused_resample and w is not None and self.up:
            x = upsample(x, self.resample_filter, max(f_pad - w_pad, 0))
            x = _conv(x, w, max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = downsample(_conv(x, w, w_pad + f_pad), self.resample_filter, 0)
        else:
            if self.up:
                x = upsample(x, self.resample_filter, f_pad)
            if self.down:
                x = downsample(x, self.resample_filter, f_pad)
            if w is not None:
                x = _conv(x, w, w_pad)
        return x + b if b is not None else x


class StridedConv2d(nn.Module):
    """3x3 convolution with stride 2 and padding 1 (guided-diffusion ``Downsample`` with conv)."""

    in_channels: int
    out_channels: int
    winit: Init = Init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,in] -> [B,H/2,W/2,out] (H, W even)."""
        cin, cout, m = self.in_channels, self.out_channels, self.winit.mode
        fans = (cin * 9, cout * 9)
        w = self.param("kernel", weight_init(m, *fans, self.winit.weight), (3, 3, cin, cout))
        b = self.param("bias", weight_init(m, *fans, self.winit.bias), (cout,))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            w.astype(self.dtype),
            (2, 2),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + b.astype(self.dtype)


def _conv(x: Array, w: Array, pad: int) -> Array:
    """Stride-1 convolution of x [B,H,W,I] with w [k,k,I,O] and symmetric zero padding."""
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class GroupNorm(nn.Module):
    """Group normalisation, min(32, C/4) groups, statistics in float32 (reference ``GroupNorm``)."""

    num_channels: int
    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,C] -> normalised per (sample, group), then scale * x + bias."""
        C = self.num_channels
        G = min(self.num_groups, C // self.min_channels_per_group)
        scale = self.param("scale", nn.initializers.ones, (C,))
        bias = self.param("bias", nn.initializers.zeros, (C,))
        xf = x.astype(jnp.float32)
        d = xf - _group_mean(xf, G)  # two passes, as the reference
        inv = jax.lax.rsqrt(_group_mean(jnp.square(d), G) + self.eps)
        return (d * (inv * scale) + bias).astype(self.dtype)


def _group_mean(x: Array, groups: int) -> Array:
    """[B,H,W,C] -> [B,1,1,C]: the mean over (H, W, channels of the group), per channel.

    Sums over H, W first with channels minor (vectorised on XLA:CPU), then over each group's
    channels: 2-3x faster forward+backward on the CPU than reducing a [B,H,W,G,C/G] view.
    """
    B, H, W, C = x.shape
    per_group = x.sum(axis=(1, 2)).reshape(B, groups, C // groups).sum(-1) / (H * W * C // groups)
    return jnp.repeat(per_group, C // groups, axis=1)[:, None, None, :]


ATTENTION_IMPLS = (None, "xla", "cudnn")
# Channel order of a fused qkv: NVlabs (head, d, q/k/v); guided-diffusion QKVAttentionLegacy
# (head, q/k/v, d) (unet.py:361); QKVAttention / "new order" (q/k/v, head, d) (unet.py:395).
QKV_LAYOUTS = ("nvlabs", "legacy", "new")


def split_qkv(qkv: Array, num_heads: int, layout: str = "nvlabs") -> tuple[Array, Array, Array]:
    """Fused qkv [B, T, 3C] in one of QKV_LAYOUTS -> q, k, v each [B, T, heads, C/heads]."""
    B, T, C3 = qkv.shape
    d = C3 // 3 // num_heads
    if layout == "nvlabs":
        r = qkv.reshape(B, T, num_heads, d, 3)
        return r[..., 0], r[..., 1], r[..., 2]
    if layout == "legacy":
        r = qkv.reshape(B, T, num_heads, 3, d)
        return r[:, :, :, 0], r[:, :, :, 1], r[:, :, :, 2]
    if layout == "new":
        r = qkv.reshape(B, T, 3, num_heads, d)
        return r[:, :, 0], r[:, :, 1], r[:, :, 2]
    raise ValueError(f"unknown qkv layout {layout!r}; valid: {list(QKV_LAYOUTS)}")


def self_attention(
    qkv: Array, num_heads: int, implementation: str | None = None, layout: str = "nvlabs"
) -> Array:
    """Multi-head attention from a fused qkv [B,H,W,3C] laid out as ``layout`` (QKV_LAYOUTS).

    implementation: None/'xla' (any device) or 'cudnn' (fused GPU kernel, bf16/fp16 only).
    """
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    q, k, v = split_qkv(qkv.reshape(B, H * W, C3), num_heads, layout)  # [B, T, N, C/N]
    impl = {"xla": "xla", "cudnn": "cudnn"}.get(implementation or "")  # checked Literal
    a = jax.nn.dot_product_attention(q, k, v, implementation=impl)  # type: ignore[arg-type]
    # softmax(q k^T/sqrt(d)) v
    return a.reshape(B, H, W, C)


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention (reference ``UNetBlock``)."""

    in_channels: int
    out_channels: int
    emb_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int | None = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: tuple[float, ...] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    winit: Init = Init()
    winit_zero: Init = Init(weight=0.0)
    winit_attn: Init | None = None
    attn_impl: str | None = None
    dtype: Dtype = jnp.float32
    min_channels_per_group: int = 4  # 1: always 32 groups (guided-diffusion GroupNorm32)
    qkv_layout: str = "nvlabs"  # one of QKV_LAYOUTS

    @property
    def heads(self) -> int:
        """Number of attention heads (0 without attention)."""
        if not self.attention:
            return 0
        return (
            self.num_heads
            if self.num_heads is not None
            else self.out_channels // self.channels_per_head
        )

    def _conv(self, name: str, cin: int, cout: int, kernel: int, init: Init, **kw) -> Conv2d:
        """A Conv2d of this block computing in self.dtype."""
        return Conv2d(cin, cout, kernel, winit=init, dtype=self.dtype, name=name, **kw)

    def _skip(self, x: Array) -> Array:
        """The shortcut: identity, or resample and/or 1x1 projection."""
        cin, cout = self.in_channels, self.out_channels
        if cout == cin and not (self.up or self.down):
            return x
        kernel = 1 if (self.resample_proj or cout != cin) else 0
        rs = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
        return self._conv("skip", cin, cout, kernel, self.winit, **rs)(x)

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """x [B,H,W,in], emb [B,emb_channels] (float32) -> [B,H',W',out]."""
        C = self.out_channels
        norm = dict(
            eps=self.eps, dtype=self.dtype, min_channels_per_group=self.min_channels_per_group
        )
        orig = x
        rs = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
        x = GroupNorm(self.in_channels, name="norm0", **norm)(x)
        x = self._conv("conv0", self.in_channels, C, 3, self.winit, **rs)(nn.silu(x))
        n_affine = C * (2 if self.adaptive_scale else 1)
        params = Linear(self.emb_channels, n_affine, winit=self.winit, name="affine")(emb)
        params = params.astype(self.dtype)[:, None, None, :]  # [B,1,1,n_affine]
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + GroupNorm(C, name="norm1", **norm)(x) * (scale + 1))
        else:
            x = nn.silu(GroupNorm(C, name="norm1", **norm)(x + params))
        if self.dropout and train:
            x = hashrng.dropout(self.make_rng("dropout"), x, self.dropout)
        x = self._conv("conv1", C, C, 3, self.winit_zero)(x)
        x = (x + self._skip(orig)) * self.skip_scale
        if self.heads:
            winit_attn = self.winit_attn if self.winit_attn is not None else self.winit
            qkv = self._conv("qkv", C, 3 * C, 1, winit_attn)(GroupNorm(C, name="norm2", **norm)(x))
            a = self_attention(qkv, self.heads, self.attn_impl, self.qkv_layout)
            x = (self._conv("proj", C, C, 1, self.winit_zero)(a) + x) * self.skip_scale
        return x


def positional_embedding(
    x: Array, num_channels: int, max_positions: int = 10000, endpoint: bool = False
) -> Array:
    """Transformer sinusoidal embedding [cos(x w), sin(x w)], float32 [B, num_channels]."""
    half = num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** freqs
    x = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)] (NCSN++); f is a fixed buffer.

    ``freqs`` lives in the params (so checkpoints carry it) but receives no gradient and is
    not counted as a parameter, as in the reference where it is a buffer.
    """

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B] -> float32 [B, num_channels]."""
        init = lambda key, shape: jax.random.normal(key, shape) * self.scale  # noqa: E731
        freqs = jax.lax.stop_gradient(self.param("freqs", init, (self.num_channels // 2,)))
        x = jnp.asarray(x, jnp.float32)[:, None] * (2 * np.pi * freqs)[None, :]
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
