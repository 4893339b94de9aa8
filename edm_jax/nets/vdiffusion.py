"""The networks of crowsonkb/v-diffusion-pytorch's model zoo (``diffusion/models/*.py``), NHWC.

Every released model is one U-Net of nested ``SkipBlock``s: per level ``num_blocks`` residual
conv blocks (optionally each followed by self-attention), the next level between an average
pool and a 2x upsampling, then ``num_blocks`` more blocks on the concatenation of the skip
and the inner output. The deepest level has 2 ``num_blocks`` blocks and no concatenation.
Two families differ in details (fixtures README "v-diffusion"):

- group A (cc12m_1, yfcc_1, yfcc_2): Fourier features of t, ``cat([main, skip])``, bilinear
  upsampling, ``GroupNorm(1, C)`` before attention; cc12m_1 adds a CLIP-embedding mapping
  network whose output modulates every conv block (``ResModConvBlock``/``Modulation2d``).
- group B (wikiart_128/256, danbooru_128, imagenet_128): Fourier features of
  log SNR = log(cos^2(t pi/2) / sin^2(t pi/2)), ``cat([skip, main])``, nearest upsampling,
  no normalisation.

Flax module names are the torch state_dict prefixes (``net.4.main.1.main.0``), so the
conversion in ``from_vd_state_dict`` is a transpose per tensor. ``VD_PRESETS`` lists the
released models; ``vd_sampling_model`` wraps one as k-diffusion's ``VDenoiser``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.nets.layers import Conv2d, GroupNorm, Init, Linear, downsample, upsample
from edm_jax.wrappers import SamplingModel, VDenoiser

Array = jax.Array
Dtype = Any

TIMESTEP_INPUTS = ("t", "log_snr")
UPSAMPLE_MODES = ("bilinear", "nearest")
# torch's default Conv2d/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
TORCH_INIT = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))


class FourierFeatures(nn.Module):
    """[cos(2 pi x W^T), sin(2 pi x W^T)] (v-diffusion ``FourierFeatures``; cos first)."""

    in_features: int
    out_features: int
    std: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, in] -> float32 [B, out]."""
        init = lambda key, shape: jax.random.normal(key, shape) * self.std  # noqa: E731
        w = self.param("kernel", init, (self.in_features, self.out_features // 2))
        f = 2 * math.pi * jnp.asarray(x, jnp.float32) @ w  # cc12m_1.py:63
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


def _norm1(x: Array, eps: float = 1e-5) -> Array:
    """GroupNorm(1, C, affine=False): normalise each sample over (H, W, C) in float32."""
    xf = x.astype(jnp.float32)
    d = xf - xf.mean(axis=(1, 2, 3), keepdims=True)
    return (d * jax.lax.rsqrt(jnp.square(d).mean(axis=(1, 2, 3), keepdims=True) + eps)).astype(
        x.dtype
    )


def upsample_bilinear(x: Array) -> Array:
    """2x bilinear upsampling with align_corners=False (torch ``nn.Upsample``), x [B,H,W,C]."""
    for axis in (1, 2):
        n = x.shape[axis]
        first, last = (
            jax.lax.slice_in_dim(x, 0, 1, axis=axis),
            jax.lax.slice_in_dim(x, n - 1, n, axis=axis),
        )
        prev = jnp.concatenate(
            [first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis
        )  # x[i-1]
        nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis)  # x[i+1]
        even, odd = 0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt  # out[2i], out[2i+1]
        x = jnp.stack([even, odd], axis=axis + 1)
        x = x.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 2 :])
    return x


def attention(qkv: Array, num_heads: int) -> Array:
    """SelfAttention2d core: qkv [B,H,W,3C] laid out (q/k/v, head, d) -> [B,H,W,C].

    q and k are each scaled by d^-1/4 (wikiart_256.py:40); logits and softmax in float32.
    """
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qkv = qkv.reshape(B, H * W, 3, num_heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, d]
    scale = d**-0.25
    logits = jnp.einsum("bqnd,bknd->bnqk", q * scale, k * scale, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", w, v).reshape(B, H, W, C)


@dataclasses.dataclass(frozen=True)
class _Block:
    """One residual conv block of the plan: torch prefix and channels."""

    prefix: str
    c_in: int
    c_mid: int
    c_out: int
    is_last: bool


class VDiffusionUNet(nn.Module):
    """A v-diffusion-pytorch model: ``v = net(x [B,H,W,3], t [B][, clip_embed [B,512]])``.

    ``channels[k]`` is the width of level k (level 0 at full resolution), ``attn_levels`` the
    levels whose blocks are each followed by self-attention with C // ``head_channels``
    heads. ``mapping_width`` > 0 gives cc12m_1's CLIP mapping and modulated conv blocks.
    """

    channels: tuple[int, ...]
    num_blocks: int
    attn_levels: tuple[int, ...] = ()
    head_channels: int = 64
    timestep_input: str = "t"  # Fourier features of t (group A) or of log SNR (group B)
    fourier_std: float = 1.0
    skip_first: bool = False  # SkipBlock order: cat([skip, main]) (group B)
    upsample_mode: str = "bilinear"
    attn_norm: bool = True  # GroupNorm(1, C) before attention (group A)
    last_relu: bool = False  # wikiart_128 / danbooru_128 keep the last block's ReLU
    mapping_width: int = 0  # cc12m_1: 1024
    clip_dim: int = 512
    mapping_fourier: int = 128
    fourier_dim: int = 16
    img_channels: int = 3
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.timestep_input not in TIMESTEP_INPUTS:
            raise ValueError(
                f"unknown timestep_input {self.timestep_input!r}; valid: {list(TIMESTEP_INPUTS)}"
            )
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(
                f"unknown upsample_mode {self.upsample_mode!r}; valid: {list(UPSAMPLE_MODES)}"
            )
        if self.mapping_width and self.last_relu:
            raise ValueError("modulated (cc12m_1) networks end without ReLU: last_relu=False")
        super().__post_init__()

    # ----------------------------------------------------------------------- layers

    def _conv(self, name: str, cin: int, cout: int, k: int, bias: bool = True) -> Conv2d:
        return Conv2d(cin, cout, k, bias=bias, winit=TORCH_INIT, dtype=self.dtype, name=name)

    def _linear(self, name: str, f_in: int, f_out: int, bias: bool = True) -> Linear:
        return Linear(f_in, f_out, bias, TORCH_INIT, name=name)  # float32 (mapping network)

    def _modulate(self, name: str, x: Array, cond: Array) -> Array:
        """Modulation2d: x (scales + 1) + shifts, [scales, shifts] = Linear_nobias(cond)."""
        lin = Linear(cond.shape[-1], 2 * x.shape[-1], bias=False, winit=TORCH_INIT, name=name)
        scales, shifts = jnp.split(lin(cond).astype(x.dtype)[:, None, None, :], 2, axis=-1)
        return x * (scales + 1) + shifts  # cc12m_1.py:39

    def _res_block(self, b: _Block, x: Array, cond: Array | None) -> Array:
        """ResConvBlock / ResModConvBlock: main(x) + skip(x), skip a 1x1 conv if C changes."""
        p = b.prefix
        skip = x if b.c_in == b.c_out else self._conv(f"{p}.skip", b.c_in, b.c_out, 1, False)(x)
        h = self._conv(f"{p}.main.0", b.c_in, b.c_mid, 3)(x)
        if cond is not None:  # conv, GN, Mod, ReLU, conv, GN, Mod, ReLU (cc12m_1.py:45)
            h = nn.relu(self._modulate(f"{p}.main.2.layer", _norm1(h), cond))
            h = self._conv(f"{p}.main.4", b.c_mid, b.c_out, 3)(h)
            if not b.is_last:
                h = nn.relu(self._modulate(f"{p}.main.6.layer", _norm1(h), cond))
        else:  # conv, ReLU, conv, ReLU (wikiart_256.py:21)
            h = self._conv(f"{p}.main.2", b.c_mid, b.c_out, 3)(nn.relu(h))
            if not b.is_last or self.last_relu:
                h = nn.relu(h)
        return h + skip

    def _attention(self, prefix: str, x: Array) -> Array:
        """SelfAttention2d: x + out_proj(attention(qkv_proj(norm(x))))."""
        C = x.shape[-1]
        if C < self.head_channels or C % (C // self.head_channels):
            raise ValueError(
                f"{prefix}: attention over {C} channels needs a multiple of C // head_channels "
                f"= {C // self.head_channels} heads (head_channels {self.head_channels})"
            )
        h = x
        if self.attn_norm:
            h = GroupNorm(C, 1, 1, eps=1e-5, dtype=self.dtype, name=f"{prefix}.norm")(h)
        qkv = self._conv(f"{prefix}.qkv_proj", C, 3 * C, 1)(h)
        y = attention(qkv, C // self.head_channels)
        return x + self._conv(f"{prefix}.out_proj", C, C, 1)(y)

    # ----------------------------------------------------------------------- U-Net

    def _half(self, k: int, prefix: str, idx: int, x: Array, cond, enc: bool) -> tuple[Array, int]:
        """The encoder or decoder blocks of level k (each + attention where enabled)."""
        C, n = self.channels[k], self.num_blocks
        deepest, top = k == len(self.channels) - 1, k == 0
        below = (self.img_channels + self.fourier_dim) if top else self.channels[k - 1]
        for i in range(n):
            c_in = below if enc and i == 0 else (2 * C if i == 0 and not deepest else C)
            c_out = C if enc or i < n - 1 else (self.img_channels if top else below)
            last = top and not enc and i == n - 1
            x = self._res_block(_Block(f"{prefix}.{idx}", c_in, C, c_out, last), x, cond)
            idx += 1
            if k in self.attn_levels:
                x, idx = self._attention(f"{prefix}.{idx}", x), idx + 1
        return x, idx

    def _level(self, k: int, prefix: str, x: Array, cond: Array | None) -> Array:
        """Level k as its nn.Sequential: [down,] blocks, [SkipBlock(k+1),] blocks[, up]."""
        idx = 0
        if k > 0:
            x, idx = downsample(x, (1, 1), 0), 1  # AvgPool2d(2)
        x, idx = self._half(k, prefix, idx, x, cond, enc=True)
        if k < len(self.channels) - 1:
            inner = self._level(k + 1, f"{prefix}.{idx}.main", x, cond)
            x = jnp.concatenate([x, inner] if self.skip_first else [inner, x], axis=-1)
            idx += 1
        x, idx = self._half(k, prefix, idx, x, cond, enc=False)
        if k > 0:
            bilinear = self.upsample_mode == "bilinear"
            x = upsample_bilinear(x) if bilinear else upsample(x, (1, 1), 0)
        return x

    def _mapping(self, t: Array, clip_embed: Array) -> Array:
        """cc12m_1's cond = mapping(cat([normalize(clip) sqrt(512), Fourier128(t)]))."""
        clip = jnp.asarray(clip_embed, jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(clip), axis=-1, keepdims=True))
        clip = clip / jnp.maximum(norm, 1e-12) * math.sqrt(self.clip_dim)  # F.normalize
        feats = FourierFeatures(1, self.mapping_fourier, name="mapping_timestep_embed")(t[:, None])
        h, W = jnp.concatenate([clip, feats], axis=1), self.mapping_width
        for i, f_in in enumerate((self.clip_dim + self.mapping_fourier, W)):  # ResLinearBlocks
            main = self._linear(f"mapping.{i}.main.0", f_in, W)(h)
            main = self._linear(f"mapping.{i}.main.2", W, W)(nn.relu(main))
            skip = h if f_in == W else self._linear(f"mapping.{i}.skip", f_in, W, False)(h)
            h = (nn.relu(main) if i == 0 else main) + skip  # the second block is_last
        return h

    def timestep_input_of(self, t: Array) -> Array:
        """What the Fourier features see: t (group A) or log SNR in float32 (group B)."""
        t = jnp.asarray(t, jnp.float32)
        if self.timestep_input == "t":
            return t
        alpha, sigma = jnp.cos(t * math.pi / 2), jnp.sin(t * math.pi / 2)
        return jnp.log(alpha**2 / sigma**2)  # utils.alpha_sigma_to_log_snr

    @nn.compact
    def __call__(self, x: Array, t: Array, clip_embed: Array | None = None) -> Array:
        """x [B,H,W,C], t [B] in [0, 1] (clip_embed [B, clip_dim] for cc12m_1) -> v [B,H,W,C]."""
        B, H, W, _ = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (B,))
        cond = None
        if self.mapping_width:
            if clip_embed is None:
                raise ValueError("this v-diffusion model (cc12m_1) needs clip_embed [B, 512]")
            clip_embed = jnp.broadcast_to(clip_embed, (B, self.clip_dim))
            cond = self._mapping(t, clip_embed)
            self.sow("intermediates", "mapping_cond", cond)
        std = self.fourier_std
        feats = FourierFeatures(1, self.fourier_dim, std, name="timestep_embed")(
            self.timestep_input_of(t)[:, None]
        )
        self.sow("intermediates", "timestep_features", feats)
        planes = jnp.broadcast_to(feats[:, None, None, :], (B, H, W, self.fourier_dim))
        h = jnp.concatenate([x.astype(self.dtype), planes.astype(self.dtype)], axis=-1)
        return self._level(0, "net", h, cond).astype(jnp.float32)


# --------------------------------------------------------------------------- presets

_A = dict(timestep_input="t", skip_first=False, upsample_mode="bilinear", attn_norm=True)
_B = dict(
    timestep_input="log_snr", fourier_std=0.2, skip_first=True, upsample_mode="nearest",
    attn_norm=False, head_channels=128,
)  # fmt: skip
# get_ddpm_schedule(0) and (1): t range of the group B models (wikiart_256.py:79)
_DDPM_T = (0.006366145797073841, 0.9957106709480286)


@dataclasses.dataclass(frozen=True)
class VDPreset:
    """A released v-diffusion model: its network, image size and t range."""

    net: dict
    size: int
    t_range: tuple[float, float] = (0.0, 1.0)
    clip_model: str | None = None


VD_PRESETS: dict[str, VDPreset] = {
    "cc12m_1": VDPreset(
        dict(channels=(128, 256, 256, 512, 512, 1024, 1024), num_blocks=4,
             attn_levels=(4, 5, 6), mapping_width=1024, **_A), 256, clip_model="ViT-B/16"),
    "cc12m_1_cfg": VDPreset(
        dict(channels=(128, 256, 256, 512, 512, 1024, 1024), num_blocks=4,
             attn_levels=(4, 5, 6), mapping_width=1024, **_A), 256, clip_model="ViT-B/16"),
    "yfcc_1": VDPreset(
        dict(channels=(128, 128, 256, 256, 512, 512, 1024, 1024), num_blocks=4,
             attn_levels=(5, 6, 7), **_A), 512),
    "yfcc_2": VDPreset(
        dict(channels=(128, 256, 512, 512, 1024, 1024, 2048, 2048), num_blocks=2,
             attn_levels=(5, 6, 7), **_A), 512),
    "wikiart_256": VDPreset(
        dict(channels=(64, 128, 256, 256, 512, 512, 1024), num_blocks=4,
             attn_levels=(4, 5, 6), **_B), 256, _DDPM_T),
    "wikiart_128": VDPreset(
        dict(channels=(128, 256, 256, 512, 512, 1024), num_blocks=4, last_relu=True, **_B),
        128, _DDPM_T),
    "danbooru_128": VDPreset(
        dict(channels=(256, 512, 512, 1024, 1024, 2048), num_blocks=2, attn_levels=(3, 4, 5),
             last_relu=True, **_B), 128, _DDPM_T),
    "imagenet_128": VDPreset(
        dict(channels=(128, 256, 256, 512, 512, 1024), num_blocks=4, attn_levels=(3, 4, 5),
             **_B), 128, _DDPM_T),
}  # fmt: skip


def vd_preset(name: str) -> VDPreset:
    """The released model ``name`` (a key of ``VD_PRESETS``), with a clear error otherwise."""
    if name not in VD_PRESETS:
        raise ValueError(f"unknown v-diffusion model {name!r}; valid: {sorted(VD_PRESETS)}")
    return VD_PRESETS[name]


def build_vd_net(name: str, dtype: Dtype = jnp.float32) -> VDiffusionUNet:
    """The Flax network of the released v-diffusion model ``name``."""
    return VDiffusionUNet(**vd_preset(name).net, dtype=dtype)


# --------------------------------------------------------------------------- conversion

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def param_shapes(net: VDiffusionUNet) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {leaf: shape}} of the network's Flax params, via jax.eval_shape (no compute)."""
    return {m: dict(d) for m, d in _param_shapes(net).items()}


@functools.lru_cache(maxsize=16)
def _param_shapes(net: VDiffusionUNet) -> dict[str, dict[str, tuple[int, ...]]]:
    """param_shapes, traced once per network configuration (a few seconds at full size)."""
    size = 2 ** (len(net.channels) - 1)  # parameters do not depend on the image size
    x = jax.ShapeDtypeStruct((1, size, size, net.img_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    clip = jax.ShapeDtypeStruct((1, net.clip_dim), jnp.float32) if net.mapping_width else None
    key = jax.random.key(0, impl="rbg")  # shapes only: rbg traces ~20% faster than threefry
    shapes = jax.eval_shape(functools.partial(net.init, key), x, t, clip)["params"]
    return {m: {leaf: tuple(a.shape) for leaf, a in d.items()} for m, d in shapes.items()}


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax -> torch layout of a shape: HWIO -> OIHW, [in, out] -> [out, in]."""
    if leaf != "kernel":
        return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def torch_shapes(net: VDiffusionUNet) -> dict[str, tuple[int, ...]]:
    """The reference state_dict's {name: shape} (v-diffusion-pytorch names, torch layouts)."""
    return {
        f"{m}.{_LEAVES[leaf]}": _torch_shape(leaf, s)
        for m, d in param_shapes(net).items()
        for leaf, s in d.items()
    }


def _from_torch(leaf: str, a: np.ndarray) -> np.ndarray:
    """torch layout -> Flax (OIHW -> HWIO, [out, in] -> [in, out])."""
    if leaf != "kernel":
        return a
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T


def from_vd_state_dict(state_dict: dict[str, np.ndarray], net: VDiffusionUNet) -> dict:
    """Flax params of ``net`` from a v-diffusion-pytorch state_dict (names as in the .pth).

    Raises ValueError naming the first missing, unexpected or mis-shaped tensor.
    """
    expected = torch_shapes(net)
    missing = [k for k in expected if k not in state_dict]
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ValueError(
            f"state_dict does not fit this v-diffusion network: {which} "
            f"({len(missing)} missing, {len(extra)} unexpected of {len(expected)} expected)"
        )
    params: dict[str, dict[str, np.ndarray]] = {}
    for module, leaves in param_shapes(net).items():
        for leaf in leaves:
            name = f"{module}.{_LEAVES[leaf]}"
            a = np.asarray(state_dict[name], np.float32)
            if tuple(a.shape) != expected[name]:
                raise ValueError(f"{name}: shape {a.shape}, this network needs {expected[name]}")
            params.setdefault(module, {})[leaf] = _from_torch(leaf, a)
    return params


def to_vd_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The v-diffusion-pytorch state_dict (torch layouts) of Flax params."""
    out = {}
    for module, leaves in params.items():
        for leaf, a in leaves.items():
            a = np.asarray(a)
            if leaf == "kernel":
                a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
            out[f"{module}.{_LEAVES[leaf]}"] = a
    return out


# --------------------------------------------------------------------------- sampling


def vd_sampling_model(
    net: VDiffusionUNet,
    size: int,
    *,
    t_range: tuple[float, float] = (0.0, 1.0),
    clip_embed=None,
    cfg_scale: float = 1.0,
) -> SamplingModel:
    """The network as k-diffusion's ``VDenoiser`` in the form ``edm_jax.sample`` takes.

    ``denoise(params, x, sigma)`` = VDenoiser: t = atan(sigma) 2/pi, D = c_skip x + c_out v.
    The sigma range is tan(t pi/2) over ``t_range`` (the model's min_t/max_t). cc12m_1 needs
    ``clip_embed`` [1 or B, 512]; ``cfg_scale`` w != 1 is cc12m_1_cfg's classifier-free
    guidance (cfg_sample.py): v = v_0 + w (v_c - v_0), v_0 at the zero embedding, both in
    one batched call.
    """
    if net.mapping_width and clip_embed is None:
        raise ValueError("cc12m_1 samples need clip_embed [1 or B, 512]; got None")
    if cfg_scale != 1.0 and not net.mapping_width:
        raise ValueError(f"cfg_scale {cfg_scale} needs a CLIP-conditioned model (cc12m_1_cfg)")
    clip = None if clip_embed is None else jnp.asarray(clip_embed, jnp.float32)

    def model(x_in: Array, t: Array, params=None) -> Array:
        if cfg_scale == 1.0:
            return net.apply({"params": params}, x_in, t, clip)  # type: ignore[return-value]
        c = jnp.broadcast_to(jnp.asarray(clip), (x_in.shape[0], net.clip_dim))  # [B, 512]
        both = jnp.concatenate([c, jnp.zeros_like(c)])  # [2B, 512]: cond, then uncond
        v = net.apply({"params": params}, jnp.concatenate([x_in, x_in]), jnp.tile(t, 2), both)
        v_c, v_0 = jnp.split(jnp.asarray(v), 2)
        return v_0 + cfg_scale * (v_c - v_0)

    lo, hi = (math.tan(t * math.pi / 2) for t in t_range)
    sigma_range = None if t_range == (0.0, 1.0) else (lo, hi)
    return SamplingModel(VDenoiser(model), (size, size, net.img_channels), sigma_range=sigma_range)


def load_vdiffusion(
    name: str,
    state_dict: dict[str, np.ndarray],
    *,
    clip_embed=None,
    cfg_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
) -> tuple[SamplingModel, dict, dict]:
    """(model, params, config) of a released v-diffusion model from its state_dict.

    The same triple as ``edm_jax.load``: ``edm_jax.sample(rng, params, model, ...)`` samples
    it. ``name`` is a key of ``VD_PRESETS``; a state_dict of another model is refused naming
    its first mismatching tensor.
    """
    preset = vd_preset(name)
    net = build_vd_net(name, dtype)
    params = from_vd_state_dict(state_dict, net)
    model = vd_sampling_model(
        net, preset.size, t_range=preset.t_range, clip_embed=clip_embed, cfg_scale=cfg_scale
    )
    config = {"family": "v-diffusion", "name": name, "size": preset.size, "net": preset.net}
    return model, params, config
