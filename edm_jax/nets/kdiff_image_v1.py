"""k-diffusion's ``image_v1`` U-Net (``ImageDenoiserModelV1`` in ``KarrasAugmentWrapper``), NHWC.

Layer for layer with ``k_diffusion/models/image_v1.py`` and ``layers.py``: a Fourier time
embedding and a 2-layer GELU mapping network (conditioned on aug_cond ++ mapping_cond),
ResConvBlocks with AdaGN (GroupNorm c//32 groups, eps 1e-5), self-attention with (t nh e)
qkv channels, reflect-padded [1,3,3,1]/8 resamplers, skip concat [x, skip], ``skip_stages``
(levels < s are kept but unused; level s has no resampler), ``patch_size`` (pixel_unshuffle),
and ``has_variance`` (a logvar channel, averaged). The network takes c_noise = ln(sigma)/4.
Progressive growing: ``grow_params`` carries every shared parameter into a model with fewer
skipped stages or a smaller patch, proj_in re-initialised (torch default) and proj_out zero.

SelfAttention2d in the reference applies attention dropout even in eval mode; here dropout
acts only when ``train=True`` (the fixtures and the bundled configs' sampling differ from
the reference by that noise only when dropout_rate > 0).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.nets.kdiff_layers import FourierFeatures, gelu, torch_linear_init
from edm_jax.nets.layers import _depthwise

Array = jax.Array

LINEAR_KERNEL = (1 / 8, 3 / 8, 3 / 8, 1 / 8)  # k-diffusion layers._kernels['linear']


def resample_kernels() -> tuple[np.ndarray, np.ndarray]:
    """(Downsample2d, Upsample2d) ``kernel`` buffers: k k^T and (2k)(2k)^T, float32 [4, 4]."""
    k = np.asarray([LINEAR_KERNEL], np.float32)
    return k.T @ k, (2 * k).T @ (2 * k)


def downsample2d(x: Array) -> Array:
    """Reflect-pad 1, depthwise [1,3,3,1]/8 outer filter, stride 2: [B,H,W,C] -> [B,H/2,W/2,C]."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return _depthwise(x, resample_kernels()[0], pad=0, stride=2, dilation=1)


def upsample2d(x: Array) -> Array:
    """Reflect-pad 1, transposed depthwise conv (stride 2, padding 3): [B,H,W,C] -> [B,2H,2W,C]."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return _depthwise(x, resample_kernels()[1], pad=0, stride=1, dilation=2)  # symmetric filter


def conv_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch Conv2d default init U(+-1/sqrt(fan_in)) for an HWIO kernel."""
    bound = 1 / math.sqrt(shape[0] * shape[1] * shape[2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv2d(nn.Module):
    """torch nn.Conv2d (k x k, zero 'same' padding), kernel HWIO; default init as torch's."""

    features: int
    k: int
    bias: bool = True
    zero: bool = False  # zero-initialised weight and bias (the reference's residual outputs)
    orthogonal: bool = False  # nn.init.orthogonal_ weight (ResConvBlock skip)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,C_in] -> [B,H,W,features]."""
        fan_in = x.shape[-1] * self.k * self.k
        shape = (self.k, self.k, x.shape[-1], self.features)
        init = nn.initializers.orthogonal() if self.orthogonal else conv_init
        w = self.param("kernel", nn.initializers.zeros if self.zero else init, shape, jnp.float32)
        pad = ((self.k // 2, self.k // 2),) * 2
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), pad, dimension_numbers=dims)
        if self.bias:
            b_init = nn.initializers.zeros if self.zero else _bias_init(fan_in)
            y = y + self.param("bias", b_init, (self.features,), jnp.float32).astype(x.dtype)
        return y


def group_norm(x: Array, groups: int, eps: float = 1e-5) -> Array:
    """F.group_norm without affine: contiguous channel groups, biased variance, float32 stats."""
    B, H, W, C = x.shape
    g = x.astype(jnp.float32).reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(B, H, W, C).astype(x.dtype)


class AdaGN(nn.Module):
    """GroupNorm modulated by the mapping output: bias + x * (weight + 1), mapper zero-init."""

    groups: int

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        """x [B,H,W,C], cond [B,F] -> [B,H,W,C]."""
        C = x.shape[-1]
        wb = nn.Dense(2 * C, kernel_init=nn.initializers.zeros, name="mapper")(cond)
        weight, bias = wb[:, None, None, :C], wb[:, None, None, C:]
        return bias + group_norm(x, self.groups) * (weight + 1)


class ResConvBlock(nn.Module):
    """AdaGN, GELU, conv3, dropout2d, AdaGN, GELU, conv3 (zero-init), dropout2d; + 1x1 skip."""

    c_mid: int
    c_out: int
    dropout: float = 0.0
    group_size: int = 32

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B,H,W,c_in] -> [B,H,W,c_out]."""
        c_in = x.shape[-1]
        drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)
        h = gelu(AdaGN(max(1, c_in // self.group_size), name="main_0")(x, cond))
        h = drop(Conv2d(self.c_mid, 3, name="main_2")(h))
        h = gelu(AdaGN(max(1, self.c_mid // self.group_size), name="main_4")(h, cond))
        h = drop(Conv2d(self.c_out, 3, zero=True, name="main_6")(h))
        if c_in != self.c_out:
            x = Conv2d(self.c_out, 1, bias=False, orthogonal=True, name="skip")(x)
        return h + x


class SelfAttention2d(nn.Module):
    """AdaGN -> 1x1 qkv (channels (t nh e)) -> softmax attention -> 1x1 out_proj (zero-init), residual."""

    n_head: int
    groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B,H,W,C] -> [B,H,W,C]."""
        B, H, W, C = x.shape
        e = C // self.n_head
        qkv = Conv2d(3 * C, 1, name="qkv_proj")(AdaGN(self.groups, name="norm_in")(x, cond))
        q, k, v = jnp.moveaxis(qkv.reshape(B, H * W, 3, self.n_head, e), 2, 0)  # (t nh e)
        logits = jnp.einsum(
            "bind,bjnd->bnij", q, k, preferred_element_type=jnp.float32
        ) / math.sqrt(e)
        p = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.softmax(logits, axis=-1))
        y = jnp.einsum("bnij,bjnd->bind", p.astype(v.dtype), v).reshape(B, H, W, C)
        return x + Conv2d(C, 1, zero=True, name="out_proj")(y)


class Block(nn.Module):
    """A DBlock / UBlock's ResConvBlock [+ SelfAttention2d] layers, named by ModuleList index."""

    depth: int
    c_mid: int
    c_out: int
    attn: bool
    first: int  # DBlock: 1 (index 0 is the resampler); UBlock: 0 (the resampler is last)
    dropout: float = 0.0
    resample: str = "none"  # "down": Downsample2d first (DBlock); "up": Upsample2d last (UBlock)
    group_size: int = 32
    head_size: int = 64

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B,H,W,c_in] -> [B,H',W',c_out] (H' = H/2, H or 2H by `resample`)."""
        x = downsample2d(x) if self.resample == "down" else x
        idx = self.first
        for i in range(self.depth):
            c_out = self.c_mid if i < self.depth - 1 else self.c_out
            x = ResConvBlock(self.c_mid, c_out, self.dropout, name=str(idx))(x, cond, train)
            idx += 1
            if self.attn:
                heads, groups = max(1, c_out // self.head_size), max(1, c_out // self.group_size)
                x = SelfAttention2d(heads, groups, self.dropout, name=str(idx))(x, cond, train)
                idx += 1
        return upsample2d(x) if self.resample == "up" else x


class UNet(nn.Module):
    """k-diffusion layers.UNet of DBlocks / UBlocks with skip_stages (params under ``u_net``).

    ``u_blocks_j`` is the reference ModuleList index: u_blocks.0 is the deepest level.
    """

    depths: tuple[int, ...]
    channels: tuple[int, ...]
    self_attn_depths: tuple[bool, ...]
    skip_stages: int = 0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
        """x [B,H,W,channels[max(0,s-1)]] -> same shape."""
        n, s = len(self.depths), self.skip_stages
        if self.is_initializing():  # levels < skip_stages are unused but kept, as the reference
            for i in range(s):
                self._down(i)(jnp.zeros((1, 2, 2, self.channels[max(0, i - 1)])), cond[:1])
                c_in = self.channels[i] * (2 if i < n - 1 else 1)
                self._up(i)(jnp.zeros((1, 2, 2, c_in)), cond[:1])
        skips = []
        for i in range(s, n):
            x = self._down(i)(x, cond, train)
            skips.append(x)
        for i in reversed(range(s, n)):
            if i < n - 1:
                x = jnp.concatenate([x, skips[i - s]], axis=-1)  # [x, skip]
            x = self._up(i)(x, cond, train)
        return x

    def _down(self, i: int) -> Block:
        """DBlock of level i (ModuleList index i; index 0 inside is the resampler)."""
        ch, attn = self.channels[i], self.self_attn_depths[i]
        resample = "down" if i > self.skip_stages else "none"
        return Block(self.depths[i], ch, ch, attn, 1, self.dropout, resample, name=f"d_blocks_{i}")

    def _up(self, i: int) -> Block:
        """UBlock of level i (ModuleList index n-1-i: u_blocks.0 is the deepest level)."""
        ch, c_out, attn = self.channels[i], self.channels[max(0, i - 1)], self.self_attn_depths[i]
        name = f"u_blocks_{len(self.depths) - 1 - i}"
        resample = "up" if i > self.skip_stages else "none"
        return Block(self.depths[i], ch, c_out, attn, 0, self.dropout, resample, name=name)


def pixel_unshuffle(x: Array, p: int) -> Array:
    """torch pixel_unshuffle in NHWC: [B,H,W,C] -> [B,H/p,W/p,C*p*p] (channel slowest)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, H // p, W // p, C * p * p)


def pixel_shuffle(x: Array, p: int) -> Array:
    """torch pixel_shuffle in NHWC: [B,h,w,C*p*p] -> [B,h*p,w*p,C]."""
    B, h, w, Cpp = x.shape
    x = x.reshape(B, h, w, Cpp // (p * p), p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h * p, w * p, Cpp // (p * p))


class MappingNet(nn.Module):
    """Linear, GELU, Linear, GELU (orthogonal weights), children named by Sequential index."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, F] -> [B, F]."""
        for i in (0, 2):
            dense = nn.Dense(
                self.features,
                kernel_init=nn.initializers.orthogonal(),
                bias_init=_bias_init(x.shape[-1]),
                name=str(i),
            )
            x = gelu(dense(x))
        return x


class ImageDenoiserV1(nn.Module):
    """``KarrasAugmentWrapper(ImageDenoiserModelV1)`` (or the bare model: augment_wrapper=False).

    ``mapping_cond_dim`` is the config's (the wrapper's 9 aug_cond features come on top).
    """

    c_in: int
    mapping_out: int
    depths: tuple[int, ...]
    channels: tuple[int, ...]
    self_attn_depths: tuple[bool, ...]
    mapping_cond_dim: int = 0
    unet_cond_dim: int = 0
    dropout: float = 0.0
    patch_size: int = 1
    skip_stages: int = 0
    has_variance: bool = False
    augment_wrapper: bool = True

    @property
    def mapping_in_dim(self) -> int:
        """Width of the inner model's mapping_cond input (aug_cond 9 ++ mapping_cond)."""
        return self.mapping_cond_dim + (9 if self.augment_wrapper else 0)

    def _mapping(self, c_noise: Array, mapping_cond: Array | None) -> Array:
        """Fourier(c_noise) + mapping_cond W^T -> Linear, GELU, Linear, GELU (orthogonal init)."""
        F = self.mapping_out
        emb = FourierFeatures(F, name="timestep_embed")(c_noise[:, None])
        if mapping_cond is not None:
            emb = emb + nn.Dense(
                F, use_bias=False, kernel_init=torch_linear_init, name="mapping_cond"
            )(mapping_cond)
        return MappingNet(F, name="mapping")(emb)

    def _wrap(self, x: Array, aug_cond, mapping_cond) -> Array | None:
        """KarrasAugmentWrapper: mapping_cond = aug_cond (zeros if absent) ++ mapping_cond."""
        if self.mapping_cond_dim and mapping_cond is None:
            raise ValueError(
                f"mapping_cond [B, {self.mapping_cond_dim}] is required (mapping_cond_dim > 0)"
            )
        if not self.augment_wrapper:
            return mapping_cond
        aug_cond = jnp.zeros((x.shape[0], 9), x.dtype) if aug_cond is None else aug_cond
        return (
            aug_cond if mapping_cond is None else jnp.concatenate([aug_cond, mapping_cond], axis=1)
        )

    @nn.compact
    def __call__(
        self,
        x,
        c_noise,
        aug_cond=None,
        mapping_cond=None,
        unet_cond=None,
        *,
        return_variance=False,
        train=False,
    ):
        """x [B,H,W,c_in], c_noise [B] = ln(sigma)/4 -> [B,H,W,c_in] (and logvar [B])."""
        p, width = self.patch_size, self.channels[max(0, self.skip_stages - 1)]
        cond = self._mapping(c_noise, self._wrap(x, aug_cond, mapping_cond))
        if self.unet_cond_dim:
            x = jnp.concatenate([x, unet_cond], axis=-1)
        x = Conv2d(width, 1, name="proj_in")(pixel_unshuffle(x, p) if p > 1 else x)
        unet = UNet(
            self.depths,
            self.channels,
            self.self_attn_depths,
            self.skip_stages,
            self.dropout,
            name="u_net",
        )
        x = unet(x, cond, train)
        n_out = self.c_in * p * p + (1 if self.has_variance else 0)
        x = Conv2d(n_out, 1, zero=True, name="proj_out")(x)
        logvar = None
        if self.has_variance:
            x, logvar = x[..., :-1], x[..., -1].reshape(x.shape[0], -1).mean(axis=1)
        x = pixel_shuffle(x, p) if p > 1 else x
        return (x, logvar) if self.has_variance and return_variance else x

    def dummy_inputs(self) -> tuple:
        """(x, c_noise, aug_cond, mapping_cond, unet_cond) zeros that create every parameter."""
        side = self.patch_size * 2 ** (len(self.depths) - 1 - self.skip_stages) * 2
        mc = jnp.zeros((1, self.mapping_cond_dim)) if self.mapping_cond_dim else None
        uc = jnp.zeros((1, side, side, self.unet_cond_dim)) if self.unet_cond_dim else None
        return jnp.zeros((1, side, side, self.c_in)), jnp.zeros((1,)), None, mc, uc

    def init_params(self, rng: Array) -> dict:
        """Float32 parameters from a batch-1 dummy input."""
        return self.init({"params": rng}, *self.dummy_inputs())["params"]

    def reference_buffers(self) -> dict[str, np.ndarray]:
        """The resampler ``kernel`` buffers of the levels that resample (i > skip_stages)."""
        down, up = resample_kernels()
        n, out = len(self.depths), {}
        for i in range(self.skip_stages + 1, n):
            out[f"u_net.d_blocks.{i}.0.kernel"] = down
            last = self.depths[i] * (2 if self.self_attn_depths[i] else 1)
            out[f"u_net.u_blocks.{n - 1 - i}.{last}.kernel"] = up
        return out


def _bias_init(fan_in: int):
    """torch Linear bias init U(+-1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    return init


def grow_params(params: dict, model: ImageDenoiserV1, rng: Array) -> dict:
    """Progressive growing: `params` of a smaller run in `model` (fewer skip_stages / smaller patch).

    As ``set_skip_stages`` / ``set_patch_size``: every shared parameter is carried over, proj_in
    gets a fresh torch-default init and proj_out is zero, so the grown model starts at D = c_skip x.
    """
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init_params, jax.random.key(0)))
    old = traverse_util.flatten_dict(params)
    for k, leaf in shapes.items():
        if k[0] in ("proj_in", "proj_out"):
            continue
        if k not in old:
            raise ValueError(f"params do not fit the grown model: missing {'/'.join(k)}")
        if old[k].shape != leaf.shape:
            raise ValueError(
                f"params do not fit the grown model: {'/'.join(k)} {old[k].shape} != {leaf.shape}"
            )
    kw, kb = jax.random.split(rng)
    w_shape = shapes[("proj_in", "kernel")].shape  # [1, 1, in, out]
    bound = 1 / math.sqrt(w_shape[2])  # torch Conv2d default init, fan_in = in * 1 * 1
    out = {k: old[k] for k in shapes if k[0] not in ("proj_in", "proj_out")}
    out[("proj_in", "kernel")] = jax.random.uniform(kw, w_shape, jnp.float32, -bound, bound)
    out[("proj_in", "bias")] = jax.random.uniform(kb, (w_shape[3],), jnp.float32, -bound, bound)
    out.update({k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items() if k[0] == "proj_out"})
    return traverse_util.unflatten_dict(out)
