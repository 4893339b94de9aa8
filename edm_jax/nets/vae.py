"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax, NHWC, layer for layer.

Reproduces diffusers exactly (see ``../shared/fixtures/README.md``, vae_kl.npz): GroupNorm
with eps 1e-6 everywhere (the attention norm included), downsampling by zero-padding one
row at the bottom and one column on the right and then a 3x3 stride-2 convolution with no
padding (so odd sizes give diffusers' shapes), nearest x2 upsampling, a single-head mid-block
attention scaled by 1/sqrt(C), and the diagonal Gaussian with logvar clamped to [-30, 20].
``encode`` returns the raw moments (mean and logvar, unclamped); ``decode`` maps latents to
images. ``scaling_factor`` is never applied here (pipelines apply it, as in diffusers).

Weights: ``from_state_dict`` converts a diffusers state_dict (current ``to_q/to_k/to_v/
to_out.0`` or old ``query/key/value/proj_attn`` attention names); the converter command
``python -m edm_jax.nets.vae convert in.safetensors out.npz`` exports one to .npz.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.nets import reader

__all__ = [
    "VAE_PRESETS",
    "AutoencoderKL",
    "DiagonalGaussian",
    "VAEConfig",
    "build_vae",
    "from_state_dict",
    "init_vae",
    "random_vae_params",
    "load_vae_npz",
    "to_state_dict",
    "vae_param_count",
]

EPS = 1e-6  # diffusers' resnet_eps, used by every GroupNorm of the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers AutoencoderKL configuration fields that change the network."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215

    @classmethod
    def from_diffusers(cls, cfg: dict) -> VAEConfig:
        """From a diffusers config dict; unsupported block types or activations raise."""
        for key, valid in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
            bad = [t for t in cfg.get(key, ()) if t != valid]
            if bad:
                raise ValueError(f"VAE config {key} has {bad[0]!r}; only {valid!r} is supported")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config act_fn={cfg['act_fn']!r}; only 'silu' is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(int(c) for c in kw["block_out_channels"])
        return cls(**kw)


VAE_PRESETS: dict[str, VAEConfig] = {
    # stabilityai/sd-vae-ft-mse (and sd-vae-ft-ema, SD 1.x/2.x VAEs): 83,653,863 parameters.
    "sd-vae-ft-mse": VAEConfig(),
}


class GroupNorm(nn.Module):
    """GroupNorm with the biased two-pass variance and a per-channel affine (torch's)."""

    groups: int
    eps: float = EPS

    @nn.compact
    def __call__(self, x):  # [B,H,W,C]
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        g = x.reshape(*x.shape[:-1], self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(x.shape) * scale + bias


def _conv(ch: int, k: int, name: str, stride: int = 1, pad: int | None = None) -> nn.Conv:
    """A k x k convolution with torch's symmetric padding (k // 2 unless given)."""
    p = k // 2 if pad is None else pad
    return nn.Conv(ch, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), name=name)


class ResnetBlock(nn.Module):
    """norm1, SiLU, conv1, norm2, SiLU, conv2, plus a 1x1 shortcut when channels change."""

    out_ch: int
    groups: int

    @nn.compact
    def __call__(self, x):  # [B,H,W,Cin] -> [B,H,W,out_ch]
        h = _conv(self.out_ch, 3, "conv1")(nn.silu(GroupNorm(self.groups, name="norm1")(x)))
        h = _conv(self.out_ch, 3, "conv2")(nn.silu(GroupNorm(self.groups, name="norm2")(h)))
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, 1, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, logits / sqrt(C), residual."""

    groups: int

    @nn.compact
    def __call__(self, x):  # [B,H,W,C]
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n)(t) for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c).astype(np.float32)
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
        return x + nn.Dense(c, name="to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    ch: int
    groups: int
    attention: bool = True

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.ch, self.groups, name="resnets_0")(x)
        if self.attention:
            x = Attention(self.groups, name="attentions_0")(x)
        return ResnetBlock(self.ch, self.groups, name="resnets_1")(x)


def downsample(conv: nn.Conv, x):
    """diffusers Downsample2D: zero-pad bottom/right by one, then a stride-2 VALID conv."""
    return conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


def upsample_nearest(x):
    """Nearest-neighbour x2: every pixel repeated 2x2."""  # [B,H,W,C] -> [B,2H,2W,C]
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nn.Module):
    """conv_in, per level resnets (+ downsample), mid block, norm, SiLU, conv_out."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):  # [B,H,W,in] -> [B,H/f,W/f,2*latent]
        cfg, g = self.cfg, self.cfg.norm_num_groups
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, "conv_in")(x)
        for i, ch in enumerate(chans):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(ch, g, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:
                conv = _conv(ch, 3, f"down_blocks_{i}_downsamplers_0_conv", stride=2, pad=0)
                x = downsample(conv, x)
        x = MidBlock(chans[-1], g, cfg.mid_block_add_attention, name="mid_block")(x)
        x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    """conv_in, mid block, levels in reverse with layers+1 resnets (+ upsample), norm, conv_out."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z):  # [B,h,w,latent] -> [B,h*f,w*f,out]
        cfg, g = self.cfg, self.cfg.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, "conv_in")(z)
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, name="mid_block")(x)
        for i, ch in enumerate(chans):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(ch, g, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:
                x = _conv(ch, 3, f"up_blocks_{i}_upsamplers_0_conv")(upsample_nearest(x))
        x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
        return _conv(self.cfg.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL: `encode(x)` -> moments, `decode(z)` -> image (NHWC)."""

    cfg: VAEConfig

    def setup(self):
        """Submodules named as diffusers' (encoder, quant_conv, post_quant_conv, decoder)."""
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = (
            _conv(2 * cfg.latent_channels, 1, "quant_conv") if cfg.use_quant_conv else None
        )
        self.post_quant_conv = (
            _conv(cfg.latent_channels, 1, "post_quant_conv") if cfg.use_post_quant_conv else None
        )

    def encode(self, x):
        """Moments [B,h,w,2*latent] (mean, then unclamped logvar) of images x [B,H,W,C]."""
        m = self.encoder(x)
        return m if self.quant_conv is None else self.quant_conv(m)

    def decode(self, z):
        """Images [B,H,W,C] from latents z [B,h,w,latent] (no scaling_factor applied)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        """decode(mean of encode(x)): the deterministic reconstruction (also used by init)."""
        return self.decode(DiagonalGaussian.from_moments(self.encode(x)).mean)


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """diffusers DiagonalGaussianDistribution: logvar clamped to [-30, 20] before std."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> DiagonalGaussian:
        """Split moments [..., 2L] on channels (last axis) and clamp the logvar half."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self):
        """exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        """exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, rng):
        """mean + std * N(0, 1)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


def build_vae(name_or_cfg: str | VAEConfig | dict) -> AutoencoderKL:
    """An AutoencoderKL from a preset name, a VAEConfig or a diffusers config dict."""
    if isinstance(name_or_cfg, VAEConfig):
        return AutoencoderKL(name_or_cfg)
    if isinstance(name_or_cfg, dict):
        return AutoencoderKL(VAEConfig.from_diffusers(name_or_cfg))
    if name_or_cfg not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name_or_cfg!r}; valid: {sorted(VAE_PRESETS)}")
    return AutoencoderKL(VAE_PRESETS[name_or_cfg])


def init_vae(rng, vae: AutoencoderKL, size: Sequence[int] = (8, 8)):
    """Random parameters (Flax default initialisers) for `vae`."""
    x = jnp.zeros((1, *size, vae.cfg.in_channels), jnp.float32)
    return jax.jit(lambda r: vae.init(r, x)["params"])(rng)


def random_vae_params(seed: int, vae: AutoencoderKL) -> dict:
    """Quick NumPy random parameters: kernels N(0, 1/fan_in), norm scales 1, biases 0.

    For tests and benchmarks (Flax's own `init` takes long to compile for this network).
    """
    shapes = jax.eval_shape(lambda: init_vae(jax.random.key(0), vae))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))
        return jnp.ones(s.shape) if path[-1].key == "scale" else jnp.zeros(s.shape)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def vae_param_count(vae: AutoencoderKL) -> int:
    """Number of parameters, from shapes only (jax.eval_shape: no compute, no memory)."""
    shapes = jax.eval_shape(lambda: init_vae(jax.random.key(0), vae))
    return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


# ----------------------------------------------------------------------------------------
# Weights: diffusers state_dict (torch layouts) <-> Flax params.

_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_component(name: str) -> str:
    """Flax module name -> diffusers dotted path ('down_blocks_0_resnets_1' -> '...0.resnets.1')."""
    return re.sub(r"_(\d+)$", r".\1", re.sub(r"_(\d+)_", r".\1.", name))


def torch_name(path: tuple[str, ...]) -> str:
    """diffusers state_dict name of a Flax params path."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([_torch_component(p) for p in path[:-1]] + [leaf])


def _modern_name(name: str) -> str:
    """Rename old attention parameter names (query/key/value/proj_attn) to the current ones."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _OLD_ATTN_NAMES:
        parts[-2:-1] = _OLD_ATTN_NAMES[parts[-2]].split(".")
    return ".".join(parts)


def _to_flax(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> Flax: conv OIHW -> HWIO, Linear [out,in] -> [in,out] (1x1 convs too)."""
    if len(shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2:
        return value.reshape(value.shape[:2]).T  # Linear, or an old 1x1-conv attention weight
    return value


def from_state_dict(vae: AutoencoderKL, state_dict: dict) -> dict:
    """Flax params of `vae` from a diffusers state_dict; the first mismatching key is named."""
    shapes = jax.eval_shape(lambda: init_vae(jax.random.key(0), vae))
    flat = traverse_util.flatten_dict(shapes)
    given = {_modern_name(k): np.asarray(v, np.float32) for k, v in state_dict.items()}
    expected = {torch_name(p): p for p in flat}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(
            f"VAE state_dict does not match {vae.cfg}: first mismatching key {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected); wrong preset or config?"
        )
    out = {}
    for name in sorted(expected):
        path, shape = expected[name], flat[expected[name]].shape
        value = given[name]
        if value.size != int(np.prod(shape)) or value.ndim not in (len(shape), 4):
            raise ValueError(
                f"VAE state_dict key {name!r} has shape {value.shape}; "
                f"this config needs {shape} (Flax layout); wrong preset or config?"
            )
        out[path] = jnp.asarray(_to_flax(value, shape))
    return traverse_util.unflatten_dict(out)


def to_state_dict(params: dict) -> dict[str, np.ndarray]:
    """diffusers state_dict (current names, torch layouts) of Flax VAE params."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.asarray(v)
        out[torch_name(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    return out


def load_vae_npz(vae: AutoencoderKL, path: str | os.PathLike, prefix: str = "") -> dict:
    """Flax params from a .npz state_dict (keys optionally under `prefix`, e.g. 'param/')."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE weights not found: {path}")
    with np.load(path) as f:
        sd = {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{path}: no arrays with prefix {prefix!r}")
    return from_state_dict(vae, sd)


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """A diffusers state_dict (float32) from .safetensors/.bin/.pt/.pth/.ckpt, read without torch."""
    if not path.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
        raise ValueError(
            f"unknown weights format {path!r}; valid: .safetensors, .bin, .pt, .pth, .ckpt"
        )
    sd = reader.read_state_dict(path)  # a .ckpt's 'state_dict' is found by the reader
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def convert_main(argv: Sequence[str] | None = None) -> None:
    """`python -m edm_jax.nets.vae convert IN OUT.npz [--preset P]`: export and check weights."""
    p = argparse.ArgumentParser(prog="python -m edm_jax.nets.vae")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="diffusers .safetensors/.bin -> .npz state_dict")
    c.add_argument("src")
    c.add_argument("dest")
    c.add_argument("--preset", default="sd-vae-ft-mse", choices=sorted(VAE_PRESETS))
    c.add_argument("--config", help="a diffusers config.json (overrides --preset)")
    args = p.parse_args(argv)
    if not args.dest.endswith(".npz"):
        p.error(f"dest must end in .npz, got {args.dest!r}")
    spec = args.preset
    try:
        if not os.path.exists(args.src):
            raise FileNotFoundError(f"no such weights file: {args.src}")
        if args.config:
            with open(args.config) as f:
                spec = json.load(f)
        sd = read_torch_weights(args.src)
        from_state_dict(build_vae(spec), sd)  # checks every key and shape before writing
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    sd = {_modern_name(k): np.asarray(v, np.float32) for k, v in sd.items()}
    tmp = args.dest[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **sd)  # type: ignore[arg-type]
    os.replace(tmp, args.dest)
    print(f"wrote {args.dest}: {len(sd)} tensors, {sum(v.size for v in sd.values()):,} params")


if __name__ == "__main__":
    convert_main()
