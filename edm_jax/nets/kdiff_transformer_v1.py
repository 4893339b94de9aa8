"""k-diffusion's ``ImageTransformerDenoiserModelV1`` (``image_transformer_v1``), NHWC.

Layer for layer with ``k_diffusion/models/image_transformer_v1.py``: patching
``c (h i)(w j) -> (h w)(c i j)`` (channels slowest) with axial positions whose aspect is
multiplied by ph/pw, the mapping network on time + aug + class embeddings, pre-norm blocks
with AdaRMSNorm, QKNorm (log-scale clamped at ln 100, ``exp(0.5 s - 0.25 ln d)`` RMS scale),
learnable axial RoPE on interleaved pairs over the whole head (d_head fixed at 64), and GEGLU.
The network takes c_noise = ln(sigma)/4 where the reference takes sigma.

The reference clamps the QKNorm log-scale in place before every forward; here the forward
uses the clamped value with a straight-through gradient and ``project_params`` writes the
clamp into the parameters (call it after each optimiser step to match the stored values).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.nets.kdiff_layers import (
    AdaRMSNorm,
    FourierFeatures,
    MappingNetwork,
    RMSNorm,
    geglu_feed_forward,
    linear,
    make_axial_pos,
    rms_norm,
)

Array = jax.Array

D_HEAD = 64  # fixed in the reference's TransformerBlock
QK_MAX_SCALE = math.log(100.0)


def _log_freqs_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """freqs_pixel_log(10): linspace(ln pi, ln 5pi, d/4) for every head."""
    row = jnp.linspace(math.log(math.pi), math.log(10.0 * math.pi / 2), shape[-1], dtype=dtype)
    return jnp.broadcast_to(row, shape)


def rotate_half(x: Array) -> Array:
    """Interleaved pairs (x0, x1) -> (-x1, x0)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)


class AxialRoPE(nn.Module):
    """Learnable axial RoPE over the whole head (``axial_rope.AxialRoPE``), interleaved pairs."""

    n_heads: int
    dim: int

    @nn.compact
    def __call__(self, x: Array, pos: np.ndarray) -> Array:
        """x [B, nh, L, d], pos [L, 2] -> rotated x."""
        shape = (self.n_heads, self.dim // 4)
        freqs_h = self.param("freqs_h", _log_freqs_init, shape, jnp.float32)
        freqs_w = self.param("freqs_w", _log_freqs_init, shape, jnp.float32)
        p = jnp.asarray(pos, jnp.float32)
        f = jnp.concatenate(
            [p[:, None, None, 0] * jnp.exp(freqs_h), p[:, None, None, 1] * jnp.exp(freqs_w)], -1
        )  # [L, nh, d/2]
        f = jnp.repeat(f, 2, axis=-1).transpose(1, 0, 2).astype(x.dtype)  # [nh, L, d]
        return x * jnp.cos(f) + rotate_half(x) * jnp.sin(f)


class QKNorm(nn.Module):
    """RMS norm of q or k with a per-head learned log-scale clamped at ln(max_scale)."""

    n_heads: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, nh, L, d] -> same; scale = exp(0.5 s - 0.25 ln d)."""
        s = self.param("scale", nn.initializers.constant(math.log(10.0)), (self.n_heads,))
        s = s - jax.lax.stop_gradient(s - jnp.minimum(s, QK_MAX_SCALE))  # clamp, straight-through
        scale = jnp.exp(0.5 * s - 0.25 * math.log(x.shape[-1]))
        return rms_norm(x, scale[:, None, None], self.eps)


class SelfAttentionBlock(nn.Module):
    """AdaRMSNorm -> qkv (t h e) -> QKNorm, RoPE -> softmax attention (1/sqrt d) -> out_proj, residual."""

    d_model: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, pos: np.ndarray, cond: Array, train: bool = False) -> Array:
        """x [B, L, C], cond [B, F] -> [B, L, C]."""
        B, L, C = x.shape
        nh = C // D_HEAD
        qkv = linear(3 * C, name="qkv_proj")(AdaRMSNorm(name="norm")(x, cond))
        q, k, v = qkv.reshape(B, L, 3, nh, D_HEAD).transpose(2, 0, 3, 1, 4)  # [B, nh, L, e]
        qk_norm, rope = QKNorm(nh, name="qk_norm"), AxialRoPE(nh, D_HEAD, name="pos_emb")
        q, k = rope(qk_norm(q), pos), rope(qk_norm(k), pos)
        logits = jnp.einsum("bnid,bnjd->bnij", q, k, preferred_element_type=jnp.float32)
        p = jax.nn.softmax(logits / math.sqrt(D_HEAD), axis=-1).astype(v.dtype)
        y = jnp.einsum("bnij,bnjd->bind", p, v).reshape(B, L, C)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + linear(C, zero=True, name="out_proj")(y)


class FeedForwardBlock(nn.Module):
    """AdaRMSNorm -> GEGLU -> dropout -> down_proj (zero-init), residual."""

    d_model: int
    d_ff: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B, L, C] -> [B, L, C]."""
        h = AdaRMSNorm(name="norm")(x, cond)
        return x + geglu_feed_forward(h, self.d_model, self.d_ff, self.dropout, train)


class TransformerBlock(nn.Module):
    """self_attn then ff."""

    d_model: int
    d_ff: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, pos: np.ndarray, cond: Array, train: bool = False) -> Array:
        """x [B, L, C] -> [B, L, C]."""
        x = SelfAttentionBlock(self.d_model, self.dropout, name="self_attn")(x, pos, cond, train)
        return FeedForwardBlock(self.d_model, self.d_ff, self.dropout, name="ff")(x, cond, train)


def patch(x: Array, ph: int, pw: int) -> Array:
    """[B, H, W, C] -> [B, (H/ph)(W/pw), C*ph*pw] with channels slowest: c (h i)(w j) -> (h w)(c i j)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ph, ph, W // pw, pw, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, (H // ph) * (W // pw), C * ph * pw)


def unpatch(x: Array, h: int, w: int, ph: int, pw: int) -> Array:
    """Inverse of patch: [B, h*w, C*ph*pw] -> [B, h*ph, w*pw, C]."""
    B, _, D = x.shape
    C = D // (ph * pw)
    x = x.reshape(B, h, w, C, ph, pw).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h * ph, w * pw, C)


class ImageTransformerV1(nn.Module):
    """k-diffusion ``ImageTransformerDenoiserModelV1``; class embedding has num_classes + 1 rows."""

    n_layers: int
    d_model: int
    d_ff: int
    in_features: int = 3
    out_features: int = 3
    patch_size: tuple[int, int] = (4, 4)
    num_classes: int = 0
    dropout: float = 0.0

    def _cond(self, c_noise, aug_cond, class_cond, train) -> Array:
        """Mapping network output [B, C] from time + aug (+ class) embeddings."""
        d = self.d_model
        time_emb = linear(d, name="time_in_proj")(
            FourierFeatures(d, name="time_emb")(c_noise[:, None])
        )
        aug_emb = linear(d, name="aug_in_proj")(FourierFeatures(d, name="aug_emb")(aug_cond))
        x = time_emb + aug_emb
        if self.num_classes:
            embed = nn.Embed(
                self.num_classes + 1,
                d,
                embedding_init=nn.initializers.normal(1.0),
                name="class_emb",
            )
            x = x + embed(class_cond)
        return MappingNetwork(2, d, self.d_ff, self.dropout, name="mapping")(x, train)

    @nn.compact
    def __call__(self, x, c_noise, aug_cond=None, class_cond=None, *, train: bool = False) -> Array:
        """x [B,H,W,C], c_noise [B] = ln(sigma)/4, aug_cond [B,9], class_cond [B] -> [B,H,W,C_out]."""
        B, H, W, _ = x.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"Image size {H}x{W} is not divisible by patch size {ph}x{pw}")
        if self.num_classes and class_cond is None:
            raise ValueError(f"class_cond [B] is required: num_classes={self.num_classes}")
        aug_cond = jnp.zeros((B, 9), x.dtype) if aug_cond is None else aug_cond
        h, w = H // ph, W // pw
        pos = make_axial_pos(h, w, ph / pw).reshape(h * w, 2)
        x = linear(self.d_model, name="in_proj")(patch(x, ph, pw))
        cond = self._cond(c_noise, aug_cond, class_cond, train)
        for i in range(self.n_layers):
            x = TransformerBlock(self.d_model, self.d_ff, self.dropout, name=f"blocks_{i}")(
                x, pos, cond, train
            )
        x = RMSNorm(name="out_norm")(x)
        x = linear(self.out_features * ph * pw, zero=True, name="out_proj")(x)
        return unpatch(x, h, w, ph, pw)

    def dummy_inputs(self) -> tuple:
        """(x, c_noise, aug_cond, class_cond) zeros that create every parameter."""
        ph, pw = self.patch_size
        cls = jnp.zeros((1,), jnp.int32) if self.num_classes else None
        return jnp.zeros((1, ph, pw, self.in_features)), jnp.zeros((1,)), None, cls

    def init_params(self, rng: Array) -> dict:
        """Float32 parameters from a batch-1 dummy input."""
        return self.init({"params": rng}, *self.dummy_inputs())["params"]

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """No derived buffers (the Fourier buffers are stored leaves)."""
        return {}


def project_params(params: dict) -> dict:
    """QKNorm.proj_: clamp every ``qk_norm/scale`` at ln(100), as the reference does in place."""
    flat = traverse_util.flatten_dict(params)
    out = {
        k: jnp.minimum(v, QK_MAX_SCALE) if k[-2:] == ("qk_norm", "scale") else v
        for k, v in flat.items()
    }
    return traverse_util.unflatten_dict(out)
