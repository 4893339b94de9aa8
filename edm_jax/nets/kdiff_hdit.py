"""HDiT, k-diffusion's ``ImageTransformerDenoiserModelV2`` (hourglass diffusion transformer), NHWC.

Layer for layer with ``k_diffusion/models/image_transformer_v2.py``: TokenMerge / TokenSplit
with the lerp skip, axial positions averaged 2x2 per level, axial RoPE on the first half of
each head (pairs (x[:d], x[d:2d]), d = d_head/4), cosine-similarity attention with a learned
per-head scale (SDPA scale 1), AdaRMSNorm in float32, GEGLU feed-forwards, the mapping
network, class conditioning with the null class ``num_classes``, and the attention kinds
``global``, ``neighborhood`` (natten's clamped windows), ``shifted-window`` and ``none``.
The network takes c_noise = ln(sigma)/4 (EDM's noise label) where the reference takes sigma.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.checks import check_choice
from edm_jax.nets.kdiff_layers import (
    AdaRMSNorm,
    FourierFeatures,
    MappingNetwork,
    RMSNorm,
    _linspace_f32,
    geglu_feed_forward,
    linear,
    make_axial_pos,
)
from edm_jax.nets.neighborhood import (
    global_attention,
    neighborhood_attention,
    shifted_window_attention,
)

Array = jax.Array

ATTENTION_KINDS = ("global", "neighborhood", "shifted-window", "none")


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """Self-attention of one level: kind, head width, neighbourhood kernel / window size."""

    kind: str = "global"
    d_head: int = 64
    kernel_size: int = 7
    window_size: int = 8

    def __post_init__(self):
        check_choice("self-attention type", self.kind, ATTENTION_KINDS)


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """One hourglass level: depth (layers per side), width, d_ff, attention, dropout."""

    depth: int
    width: int
    d_ff: int
    self_attn: AttnSpec
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class MappingSpec:
    """The mapping network: depth, width, d_ff, dropout."""

    depth: int
    width: int
    d_ff: int
    dropout: float = 0.0


def rope_freqs(d_head: int, n_heads: int) -> np.ndarray:
    """HDiT AxialRoPE buffer [n_heads, d_head/8]: exp(linspace(ln pi, ln 10pi, n+1)[:-1]).view(d/8, nh).T."""
    dim = d_head // 2
    log_f = _linspace_f32(math.log(math.pi), math.log(10.0 * math.pi), n_heads * dim // 4 + 1)
    return np.exp(log_f[:-1]).reshape(dim // 4, n_heads).T.astype(np.float32)


def apply_rotary_emb(x: Array, theta: Array) -> Array:
    """Rotate the pairs (x[:d], x[d:2d]) by theta [..., d]; x[2d:] is untouched (float32 maths)."""
    d = theta.shape[-1]
    x1, x2, x3 = x[..., :d], x[..., d : 2 * d], x[..., 2 * d :]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    cos, sin = jnp.cos(theta).astype(dtype), jnp.sin(theta).astype(dtype)
    y1 = x1.astype(dtype) * cos - x2.astype(dtype) * sin
    y2 = x2.astype(dtype) * cos + x1.astype(dtype) * sin
    return jnp.concatenate([y1.astype(x.dtype), y2.astype(x.dtype), x3], axis=-1)


def scale_for_cosine_sim(
    q: Array, k: Array, scale: Array, eps: float = 1e-6
) -> tuple[Array, Array]:
    """q, k times sqrt(scale) * rsqrt(sum x^2 + eps) over the head dim (sum, not mean)."""
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.sqrt(scale.astype(dtype))

    def norm(x: Array) -> Array:
        inv = jax.lax.rsqrt(jnp.sum(jnp.square(x.astype(dtype)), axis=-1, keepdims=True) + eps)
        return x * (s * inv).astype(x.dtype)

    return norm(q), norm(k)


def downscale_pos(pos: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block of positions: [h, w, 2] -> [h/2, w/2, 2] (float32)."""
    h, w, e = pos.shape
    return (
        pos.reshape(h // 2, 2, w // 2, 2, e)
        .transpose(0, 2, 1, 3, 4)
        .reshape(h // 2, w // 2, 4, e)
        .mean(axis=2, dtype=np.float32)
    )


def _fits(grid: int, spec: AttnSpec) -> bool:
    """Whether a square token grid of side `grid` suits the attention spec."""
    if spec.kind == "neighborhood":
        return grid >= spec.kernel_size
    if spec.kind == "shifted-window":
        return grid % spec.window_size == 0
    return True


class SelfAttentionBlock(nn.Module):
    """AdaRMSNorm -> qkv -> cosine-sim + RoPE -> attention of `spec.kind` -> out_proj, residual."""

    d_model: int
    spec: AttnSpec
    shift: int = 0  # shifted-window only: ws // 2 on odd layer indices
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, pos: np.ndarray, cond: Array, train: bool = False) -> Array:
        """x [B,h,w,C], pos [h,w,2], cond [B,F] -> [B,h,w,C]."""
        B, h, w, C = x.shape
        d_head = self.spec.d_head
        nh = C // d_head
        scale = self.param("scale", nn.initializers.constant(10.0), (nh,), jnp.float32)
        qkv = linear(3 * C, name="qkv_proj", dtype=self.dtype)(AdaRMSNorm(name="norm")(x, cond))
        q, k, v = jnp.moveaxis(qkv.reshape(B, h, w, 3, nh, d_head), 3, 0)  # (t nh e)
        q, k = scale_for_cosine_sim(q, k, scale[:, None])
        freqs = jnp.asarray(rope_freqs(d_head, nh))  # [nh, d_head/8]
        p = jnp.asarray(pos, jnp.float32)[..., None, :]  # [h, w, 1, 2]; theta in float32
        theta = jnp.concatenate([p[..., 0:1] * freqs, p[..., 1:2] * freqs], axis=-1)
        q, k = apply_rotary_emb(q, theta), apply_rotary_emb(k, theta)
        if self.spec.kind == "neighborhood":
            y = neighborhood_attention(q, k, v, self.spec.kernel_size, scale=1.0)
        elif self.spec.kind == "shifted-window":
            y = shifted_window_attention(q, k, v, self.spec.window_size, self.shift, scale=1.0)
        else:
            y = global_attention(q, k, v, scale=1.0)
        y = nn.Dropout(self.dropout, deterministic=not train)(y.reshape(B, h, w, C))
        return x + linear(C, zero=True, name="out_proj", dtype=self.dtype)(y)


class FeedForwardBlock(nn.Module):
    """AdaRMSNorm -> GEGLU -> dropout -> down_proj (zero-init), residual."""

    d_model: int
    d_ff: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B,h,w,C], cond [B,F] -> [B,h,w,C]."""
        h = AdaRMSNorm(name="norm")(x, cond)
        return x + geglu_feed_forward(h, self.d_model, self.d_ff, self.dropout, train, self.dtype)


class TransformerLayer(nn.Module):
    """self_attn (absent for kind 'none') then ff, as the reference's *TransformerLayer."""

    spec: LevelSpec
    index: int  # layer index within the level side; up levels continue from depth
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, pos: np.ndarray, cond: Array, train: bool = False) -> Array:
        """x [B,h,w,C] -> [B,h,w,C]."""
        s = self.spec
        if s.self_attn.kind != "none":
            shift = s.self_attn.window_size // 2 if self.index % 2 == 1 else 0
            block = SelfAttentionBlock(
                s.width, s.self_attn, shift, s.dropout, self.dtype, name="self_attn"
            )
            x = block(x, pos, cond, train)
        return FeedForwardBlock(s.width, s.d_ff, s.dropout, self.dtype, name="ff")(x, cond, train)


class TokenMerge(nn.Module):
    """(h nh)(w nw) e -> h w (nh nw e) (channels fastest), then a linear projection."""

    out_features: int
    patch_size: tuple[int, int] = (2, 2)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,C] -> [B,H/ph,W/pw,out]."""
        B, H, W, C = x.shape
        ph, pw = self.patch_size
        x = x.reshape(B, H // ph, ph, W // pw, pw, C).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, H // ph, W // pw, ph * pw * C)
        return linear(self.out_features, name="proj", dtype=self.dtype)(x)


class TokenSplit(nn.Module):
    """Linear projection then h w (nh nw e) -> (h nh)(w nw) e; with `skip`: lerp(skip, x, fac)."""

    out_features: int
    patch_size: tuple[int, int] = (2, 2)
    with_skip: bool = True
    zero: bool = False  # patch_out is zero-initialised in the reference
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        """x [B,h,w,C] (, skip [B,h*ph,w*pw,out]) -> [B,h*ph,w*pw,out]."""
        B, h, w, _ = x.shape
        ph, pw = self.patch_size
        x = linear(self.out_features * ph * pw, zero=self.zero, name="proj", dtype=self.dtype)(x)
        x = x.reshape(B, h, w, ph, pw, self.out_features).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, h * ph, w * pw, self.out_features)
        if skip is None:
            if self.with_skip:
                raise ValueError("TokenSplit with_skip=True needs the skip tensor")
            return x
        fac = self.param("fac", nn.initializers.constant(0.5), (1,), jnp.float32)
        return skip + fac.astype(x.dtype) * (x - skip)  # torch.lerp(skip, x, fac)


class HDiT(nn.Module):
    """k-diffusion ``ImageTransformerDenoiserModelV2``: F(x_in; c_noise, aug, class, mapping cond).

    ``num_classes`` counts the dataset's classes; the class embedding has num_classes + 1 rows,
    the last (index num_classes) being the null class used for classifier-free guidance.
    """

    levels: tuple[LevelSpec, ...]
    mapping: MappingSpec
    in_channels: int = 3
    out_channels: int = 3
    patch_size: tuple[int, int] = (4, 4)
    num_classes: int = 0
    mapping_cond_dim: int = 0
    dtype: Any = (
        jnp.float32
    )  # the token path (linears, attention inputs); norms, softmax, mapping: float32

    def min_token_grid(self) -> int:
        """Smallest square level-0 token grid that every level's window or kernel fits."""
        n = len(self.levels)
        for s in range(1, 1 << 12):
            grids = [s << (n - 1 - i) for i in range(n)]
            if all(_fits(g, spec.self_attn) for g, spec in zip(grids, self.levels, strict=True)):
                return grids[0]
        raise ValueError("no image size fits these levels")

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """The derived torch buffers: each attention layer's RoPE ``pos_emb.freqs``."""
        out = {}
        *outer, mid = self.levels
        names = [(f"down_levels.{i}.{j}", s) for i, s in enumerate(outer) for j in range(s.depth)]
        names += [(f"up_levels.{i}.{j}", s) for i, s in enumerate(outer) for j in range(s.depth)]
        names += [(f"mid_level.{j}", mid) for j in range(mid.depth)]
        for name, spec in names:
            if spec.self_attn.kind != "none":
                heads = spec.width // spec.self_attn.d_head
                out[f"{name}.self_attn.pos_emb.freqs"] = rope_freqs(spec.self_attn.d_head, heads)
        return out

    def init_params(self, rng: Array) -> dict:
        """Float32 parameters from a batch-1 dummy input on the smallest grid that fits."""
        return self.init({"params": rng}, *self.dummy_inputs())["params"]

    def dummy_inputs(self) -> tuple:
        """(x, c_noise, aug_cond, class_cond, mapping_cond) zeros that create every parameter."""
        ph, pw = self.patch_size
        side = self.min_token_grid()
        x = jnp.zeros((1, side * ph, side * pw, self.in_channels), jnp.float32)
        cls = jnp.zeros((1,), jnp.int32) if self.num_classes else None
        mc = jnp.zeros((1, self.mapping_cond_dim)) if self.mapping_cond_dim else None
        return x, jnp.zeros((1,)), None, cls, mc

    def _cond(self, c_noise, aug_cond, class_cond, mapping_cond, train) -> Array:
        """The mapping network's output from the time, aug, class and mapping embeddings."""
        m = self.mapping
        time_emb = linear(m.width, name="time_in_proj")(
            FourierFeatures(m.width, name="time_emb")(c_noise[:, None])
        )
        aug_emb = linear(m.width, name="aug_in_proj")(
            FourierFeatures(m.width, name="aug_emb")(aug_cond)
        )
        x = time_emb + aug_emb
        if self.num_classes:
            x = x + nn.Embed(
                self.num_classes + 1,
                m.width,
                embedding_init=nn.initializers.normal(1.0),
                name="class_emb",
            )(class_cond)
        if self.mapping_cond_dim:
            x = x + linear(m.width, name="mapping_cond_in_proj")(mapping_cond)
        net = MappingNetwork(m.depth, m.width, m.d_ff, m.dropout, name="mapping")
        return net(x, train)

    def _check(self, x, aug_cond, class_cond, mapping_cond) -> None:
        """One clear error for a missing or mis-shaped conditioning input."""
        if self.num_classes and class_cond is None:
            raise ValueError(
                f"class_cond [B] is required: num_classes={self.num_classes} (index {self.num_classes} = null class)"
            )
        if self.mapping_cond_dim and mapping_cond is None:
            raise ValueError(
                f"mapping_cond [B, {self.mapping_cond_dim}] is required (mapping_cond_dim > 0)"
            )
        n = 2 ** (len(self.levels) - 1)
        need = (self.patch_size[0] * n, self.patch_size[1] * n)
        if x.ndim != 4 or x.shape[1] % need[0] or x.shape[2] % need[1]:
            raise ValueError(
                f"x must be [B, H, W, {self.in_channels}] with H, W divisible by {need} "
                f"(patch size x 2^(levels-1)); got {tuple(x.shape)}"
            )

    @nn.compact
    def __call__(
        self, x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None, *, train: bool = False
    ) -> Array:
        """x [B,H,W,C_in], c_noise [B] = ln(sigma)/4, aug_cond [B,9] -> [B,H,W,C_out]."""
        self._check(x, aug_cond, class_cond, mapping_cond)
        aug_cond = jnp.zeros((x.shape[0], 9), x.dtype) if aug_cond is None else aug_cond
        cond = self._cond(c_noise, aug_cond, class_cond, mapping_cond, train)
        x = TokenMerge(self.levels[0].width, self.patch_size, self.dtype, name="patch_in")(
            x.astype(self.dtype)
        )
        pos = make_axial_pos(x.shape[1], x.shape[2])
        skips, poses = [], []
        for i, spec in enumerate(self.levels[:-1]):
            for j in range(spec.depth):
                x = TransformerLayer(spec, j, self.dtype, name=f"down_levels_{i}_{j}")(
                    x, pos, cond, train
                )
            skips.append(x)
            poses.append(pos)
            x = TokenMerge(self.levels[i + 1].width, dtype=self.dtype, name=f"merges_{i}")(x)
            pos = downscale_pos(pos)
        mid = self.levels[-1]
        for j in range(mid.depth):
            x = TransformerLayer(mid, j, self.dtype, name=f"mid_level_{j}")(x, pos, cond, train)
        for i in reversed(range(len(self.levels) - 1)):
            spec = self.levels[i]
            x = TokenSplit(spec.width, dtype=self.dtype, name=f"splits_{i}")(x, skips[i])
            for j in range(spec.depth):
                x = TransformerLayer(spec, spec.depth + j, self.dtype, name=f"up_levels_{i}_{j}")(
                    x, poses[i], cond, train
                )
        x = RMSNorm(name="out_norm")(x)
        return TokenSplit(
            self.out_channels, self.patch_size, False, True, self.dtype, name="patch_out"
        )(x)
