"""Named architectures and EDM-paper presets; ``build_model`` assembles a DiffusionModel.

Base architectures follow NVlabs/edm ``train.py --arch``; presets add the paper's
per-dataset settings (EDM Table 7 / the training commands in the reference README).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from edm_jax.nets.dhariwal_unet import DhariwalUNet
from edm_jax.nets.edm2_unet import EDM2UNet
from edm_jax.nets.model import DiffusionModel
from edm_jax.nets.song_unet import SongUNet
from edm_jax.precond import get_precond

NETS: dict[str, type] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "EDM2UNet": EDM2UNet}

# arch -> (network class name, its fields), as NVlabs/edm train.py --arch.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpmpp": (
        "SongUNet",
        dict(
            embedding_type="positional",
            encoder_type="standard",
            decoder_type="standard",
            channel_mult_noise=1,
            resample_filter=(1, 1),
            model_channels=128,
            channel_mult=(2, 2, 2),
            dropout=0.13,
        ),
    ),
    "ncsnpp": (
        "SongUNet",
        dict(
            embedding_type="fourier",
            encoder_type="residual",
            decoder_type="standard",
            channel_mult_noise=2,
            resample_filter=(1, 3, 3, 1),
            model_channels=128,
            channel_mult=(2, 2, 2),
            dropout=0.13,
        ),
    ),
    "adm": ("DhariwalUNet", dict(model_channels=192, channel_mult=(1, 2, 3, 4), dropout=0.10)),
    # EDM2 (Karras et al. 2024) magnitude-preserving U-Net, networks_edm2.UNet defaults.
    "edm2": (
        "EDM2UNet",
        dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8)),
    ),
}

# preset -> (base arch, overrides): CIFAR-10 32x32, FFHQ/AFHQv2 64x64, ImageNet 64x64.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpmpp_cifar10": ("ddpmpp", dict(dropout=0.13)),
    "ncsnpp_cifar10": ("ncsnpp", dict(dropout=0.13)),
    "ddpmpp_64": ("ddpmpp", dict(channel_mult=(1, 2, 2, 2), dropout=0.05)),
    "ncsnpp_64": ("ncsnpp", dict(channel_mult=(1, 2, 2, 2), dropout=0.05)),
    "adm_imagenet64": ("adm", dict(dropout=0.10)),
}

# EDM2 train_edm2.py presets: ImageNet-512 (64x64x4 latents) and ImageNet-64 (pixels).
# Training hyperparameters: batch 2048; lr = ref_lr, decay = ref_batches (Adam 0.9/0.99).
EDM2_TRAINING: dict[str, dict[str, Any]] = {
    f"edm2-img512-{k}": dict(
        model_channels=c,
        ref_lr=lr,
        ref_batches=70000,
        dropout=d,
        P_mean=-0.4,
        P_std=1.0,
        duration_mimg=m,
        img_resolution=64,
        img_channels=4,
    )
    for k, c, lr, d, m in [
        ("xxs", 64, 0.0170, 0.0, 2048),
        ("xs", 128, 0.0120, 0.0, 2048),
        ("s", 192, 0.0100, 0.0, 2048),
        ("m", 256, 0.0090, 0.10, 2048),
        ("l", 320, 0.0080, 0.10, 1792),
        ("xl", 384, 0.0070, 0.10, 1280),
        ("xxl", 448, 0.0065, 0.10, 896),
    ]
} | {
    f"edm2-img64-{k}": dict(
        model_channels=c,
        ref_lr=lr,
        ref_batches=35000,
        dropout=d,
        P_mean=-0.8,
        P_std=1.6,
        duration_mimg=m,
        img_resolution=64,
        img_channels=3,
    )
    for k, c, lr, d, m in [
        ("xs", 128, 0.0120, 0.0, 1024),
        ("s", 192, 0.0100, 0.0, 1024),
        ("m", 256, 0.0090, 0.10, 2048),
        ("l", 320, 0.0080, 0.10, 1024),
        ("xl", 384, 0.0070, 0.10, 640),
    ]
}
PRESETS.update(
    {
        name: ("edm2", dict(model_channels=t["model_channels"], dropout=t["dropout"]))
        for name, t in EDM2_TRAINING.items()
    }
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Fields that build_model/assemble_model set themselves (not overridable by name).
_STRUCTURAL = (
    "img_resolution",
    "in_channels",
    "out_channels",
    "label_dim",
    "augment_dim",
    "dtype",
    "parent",
    "name",
)
_TUPLE_FIELDS = ("channel_mult", "attn_resolutions", "resample_filter")


def net_fields(net_cls: type) -> list[str]:
    """Names of the fields of net_cls that a user may set."""
    return [f.name for f in dataclasses.fields(net_cls) if f.name not in _STRUCTURAL]


def resolve_arch(arch: str) -> tuple[type, dict[str, Any]]:
    """(network class, fields) of a preset or base architecture name."""
    if arch in PRESETS:
        base, overrides = PRESETS[arch]
        name, fields = ARCHITECTURES[base]
        return NETS[name], {**fields, **overrides}
    if arch in ARCHITECTURES:
        name, fields = ARCHITECTURES[arch]
        return NETS[name], dict(fields)
    raise ValueError(
        f"unknown architecture {arch!r}; valid presets: {sorted(PRESETS)}, "
        f"base architectures: {sorted(ARCHITECTURES)}"
    )


def resolve_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or the jnp dtype itself) -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return dtype


def assemble_model(
    net_cls: type,
    precond,
    *,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
    dtype: Any = "float32",
    self_cond: bool = False,
    patch_size: int = 1,
    **fields,
) -> DiffusionModel:
    """DiffusionModel of network class net_cls with the given fields and preconditioning."""
    unknown = sorted(set(fields) - set(net_fields(net_cls)))
    if unknown:
        raise ValueError(
            f"unknown {net_cls.__name__} fields {unknown}; valid: {net_fields(net_cls)}"
        )
    if patch_size < 1 or img_resolution % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must be >= 1 and divide img_resolution {img_resolution}"
        )
    for k in _TUPLE_FIELDS:
        if k in fields:
            fields[k] = tuple(fields[k])
    p2 = patch_size * patch_size
    net = net_cls(
        img_resolution=img_resolution // patch_size,
        in_channels=img_channels * (2 if self_cond else 1) * p2,
        out_channels=img_channels * precond.out_channels_factor * p2,
        label_dim=label_dim,
        augment_dim=augment_dim,
        dtype=resolve_dtype(dtype),
        **fields,
    )
    return DiffusionModel(
        net,
        precond,
        img_resolution,
        img_channels,
        label_dim,
        augment_dim,
        bool(self_cond),
        patch_size,
    )


def build_model(
    arch: str,
    *,
    precond: str = "edm",
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
    dtype: Any = "float32",
    self_cond: bool = False,
    patch_size: int = 1,
    precond_kwargs: dict | None = None,
    **net_overrides,
) -> DiffusionModel:
    """A preconditioned model from a preset (e.g. 'ddpmpp_cifar10') or base arch ('adm')."""
    net_cls, fields = resolve_arch(arch)
    return assemble_model(
        net_cls,
        get_precond(precond, **(precond_kwargs or {})),
        img_resolution=img_resolution,
        img_channels=img_channels,
        label_dim=label_dim,
        augment_dim=augment_dim,
        dtype=dtype,
        self_cond=self_cond,
        patch_size=patch_size,
        **{**fields, **net_overrides},
    )
