"""Weights between openai-style state_dicts and our Flax params, both directions.

guided-diffusion ``UNetModel`` / ``EncoderUNetModel`` and the CompVis/Stability latent-diffusion
``UNetModel`` name their layers ``input_blocks.{i}.{j}``, ``middle_block.{j}``,
``output_blocks.{k}.{j}``; our networks follow the ADM plan of ``dhariwal_unet_plan`` (one
entry per input block, the middle block = ``in0`` + ``in1``, one decoder entry per output
block, the upsampler joining the previous one). The map is a rename plus a layout change per
tensor: Conv2d OIHW <-> HWIO, Conv1d [O, I, 1] (qkv, proj_out, the attention pool) and Linear
[O, I] <-> [I, O], Embedding as is. SD single-file checkpoints hold the U-Net under
``model.diffusion_model.`` (pass it as ``prefix``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.nets import ldm_unet, openai_unet
from edm_jax.nets.dhariwal_unet import dhariwal_unet_plan
from edm_jax.nets.ldm_unet import LDMUNet, init_ldm_unet
from edm_jax.nets.model import init_net

SD_UNET_PREFIX = "model.diffusion_model."

# UNetBlock submodule -> ResBlock / AttentionBlock submodule (guided_diffusion/unet.py:143,271).
_RESBLOCK = {
    "norm0": "in_layers.0",
    "conv0": "in_layers.2",
    "affine": "emb_layers.1",
    "norm1": "out_layers.0",
    "conv1": "out_layers.3",
    "skip": "skip_connection",
}
_ATTENTION = {"norm2": "norm", "qkv": "qkv", "proj": "proj_out"}
_TOP = {
    "map_layer0": ("time_embed.0", "linear"),
    "map_layer1": ("time_embed.2", "linear"),
    "map_label": ("label_emb", "embedding"),
    "out_norm": ("out.0", "vector"),
    "out_conv": ("out.2", "conv2d"),
}
_POOL = {"qkv_proj": "qkv_proj", "c_proj": "c_proj"}  # AttentionPool2d, under out.2
_TRANSFORMER = {"to_out": "to_out.0", "ff_in": "ff.net.0.proj", "ff_out": "ff.net.2"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _prefixes(net: Any) -> dict[str, tuple[str, str | None, str]]:
    """Flax top-level module -> (torch prefix, torch prefix of its attention, plan kind)."""
    enc, dec = dhariwal_unet_plan(net)
    out: dict[str, tuple[str, str | None, str]] = {
        f"enc_{s.name}": (f"input_blocks.{i}.0", f"input_blocks.{i}.1", s.kind)
        for i, s in enumerate(enc)
    }
    out[f"dec_{dec[0].name}"] = ("middle_block.0", "middle_block.1", "block")
    out[f"dec_{dec[1].name}"] = ("middle_block.2", None, "block")
    k, j = -1, 0
    for s in dec[2:]:
        if s.kind == "skip_block":
            k, j = k + 1, 0
        out[f"dec_{s.name}"] = (f"output_blocks.{k}.{j}", f"output_blocks.{k}.{j + 1}", s.kind)
        j += 2 if s.kwargs.get("attention") else 1
    for name, (_, attn, _) in list(out.items()):  # LDMUNet's SpatialTransformers
        out[f"{name}_attn"] = (str(attn), None, "transformer")
    return out


def _transformer_name(rest: tuple[str, ...], linear: bool) -> tuple[str, str]:
    """(torch name, layout) of a SpatialTransformer leaf path below the module."""
    if rest[0] in ("proj_in", "proj_out") and rest[-1] == "kernel":
        return f"{rest[0]}.weight", "linear" if linear else "linear_conv2d"
    parts = [
        f"transformer_blocks.{p[5:]}" if p.startswith("block") else _TRANSFORMER.get(p, p)
        for p in rest[:-1]
    ]
    kind = "linear" if rest[-1] == "kernel" else "vector"
    return ".".join([*parts, _LEAF[rest[-1]]]), kind


def _block_name(path: tuple[str, ...], torch: str, attn: str | None, kind: str) -> tuple[str, str]:
    """(torch name, layout) of a leaf of one plan entry (conv, strided conv or UNetBlock)."""
    leaf = _LEAF[path[-1]]
    layout = "conv2d" if path[-1] == "kernel" else "vector"
    if kind == "conv":  # the input conv, or an Upsample's conv
        return (f"{torch}.{leaf}" if path[0].startswith("enc_") else f"{torch}.conv.{leaf}"), layout
    if kind == "down_conv":
        return f"{torch}.op.{leaf}", layout
    sub = path[1]
    if sub in _ATTENTION:
        return f"{attn}.{_ATTENTION[sub]}.{leaf}", "conv1d" if layout == "conv2d" else layout
    return (
        f"{torch}.{_RESBLOCK[sub]}.{leaf}",
        "linear" if sub == "affine" and layout != "vector" else layout,
    )


def torch_entry(path: tuple[str, ...], net: Any, prefixes: dict) -> tuple[str, str]:
    """(reference state_dict name, layout kind) of one Flax params path of ``net``."""
    top = path[0]
    if top in _TOP:
        name, layout = _TOP[top]
        return f"{name}.{_LEAF[path[-1]]}", layout if path[-1] == "kernel" else "vector"
    if top == "pool":
        if path[1] == "positional_embedding":
            return "out.2.positional_embedding", "transposed"
        return f"out.2.{_POOL[path[1]]}.{_LEAF[path[-1]]}", "linear_conv1d" if path[
            -1
        ] == "kernel" else "vector"
    if top not in prefixes:
        raise ValueError(f"no reference name for params path {'/'.join(path)}")
    torch, attn, kind = prefixes[top]
    if kind == "transformer":
        name, layout = _transformer_name(path[1:], getattr(net, "use_linear_in_transformer", False))
        return f"{torch}.{name}", layout
    return _block_name(path, torch, attn, kind)


def to_torch_layout(layout: str, a: Any) -> Any:
    """A Flax array in the reference's layout (works on numpy, jax and broadcast views)."""
    if layout == "conv2d":
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if layout == "conv1d":
        return a[0, 0].T[:, :, None]  # [1,1,I,O] -> [O,I,1]
    if layout in ("linear", "transposed"):
        return a.T
    if layout == "linear_conv1d":
        return a.T[:, :, None]
    if layout == "linear_conv2d":
        return a.T[:, :, None, None]
    return a  # vector, embedding


def from_torch_layout(layout: str, a: Any) -> Any:
    """A reference array in the Flax layout (the inverse of to_torch_layout)."""
    if layout == "conv2d":
        return a.transpose(2, 3, 1, 0)
    if layout == "conv1d":
        return a[:, :, 0].T[None, None]
    if layout in ("linear", "transposed"):
        return a.T
    if layout == "linear_conv1d":
        return a[:, :, 0].T
    if layout == "linear_conv2d":
        return a[:, :, 0, 0].T
    return a


def _template(net: nn.Module) -> dict[tuple[str, ...], Any]:
    """Flat {path: ShapeDtypeStruct} of the network's parameters (no compute)."""
    if isinstance(net, LDMUNet):
        init = functools.partial(init_ldm_unet, net)
    else:
        init = functools.partial(init_net, net)
    shapes = jax.eval_shape(init, jax.random.key(0))
    return traverse_util.flatten_dict(shapes)


@functools.lru_cache(maxsize=16)
def name_map(net: nn.Module) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """Reference name -> (Flax path, layout, reference shape), for every parameter of net.

    Cached per network (a trace of its init); treat the returned dict as read-only.
    """
    prefixes = _prefixes(net)
    out = {}
    for path, leaf in _template(net).items():
        name, layout = torch_entry(path, net, prefixes)
        view = np.broadcast_to(np.float32(0), leaf.shape)  # no memory
        out[name] = (path, layout, tuple(to_torch_layout(layout, view).shape))
    return out


def reference_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Reference state_dict name -> shape that ``net`` converts from (jax.eval_shape only)."""
    return {k: v[2] for k, v in name_map(net).items()}


def _strip(state_dict: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries under prefix, without it (all of them when prefix is '')."""
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(
            f"no state_dict key starts with {prefix!r}; first keys: {list(state_dict)[:5]}"
        )
    return out


def check_state_dict(
    state_dict: dict[str, np.ndarray],
    net: nn.Module,
    family: str = "",
    expected: dict | None = None,
) -> None:
    """Raise one ValueError naming the first key (checkpoint order) that does not fit net.

    expected: {name: shape} the network converts from (default: ``reference_shapes(net)``).
    """
    expected = reference_shapes(net) if expected is None else expected
    check_shapes(state_dict, expected, f"{family or type(net).__name__} network")


def check_shapes(state_dict: dict[str, np.ndarray], expected: dict, what: str) -> None:
    """One ValueError naming the first key of state_dict that is not in expected {name: shape}
    or has another shape, else the first missing one; ``what`` names the model."""
    extra = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    for k, v in state_dict.items():
        if k not in expected:
            raise ValueError(
                f"state_dict does not match the {what}: first mismatching key {k!r} is not "
                f"one of its parameters ({len(extra)} unexpected, {len(missing)} missing)"
            )
        if tuple(np.shape(v)) != tuple(expected[k]):
            raise ValueError(
                f"state_dict does not match the {what}: first mismatching key {k!r} has "
                f"shape {tuple(np.shape(v))}, expected {tuple(expected[k])}"
            )
    if missing:
        raise ValueError(
            f"state_dict does not match the {what}: first missing key {missing[0]!r} "
            f"({len(missing)} missing)"
        )


def from_openai_state_dict(
    state_dict: dict[str, np.ndarray], net: nn.Module, *, prefix: str = "", family: str = ""
) -> dict:
    """Reference state_dict (torch layouts, names as the checkpoint's) -> float32 Flax params.

    prefix: the U-Net's name prefix in the file ('model.diffusion_model.' for SD checkpoints;
    other keys are ignored then). Raises ValueError naming the first mismatching key.
    """
    sd = _strip(state_dict, prefix)
    check_state_dict(sd, net, family)
    flat = {}
    for name, (path, layout, _) in name_map(net).items():
        a = from_torch_layout(layout, np.asarray(sd[name], np.float32))
        flat[path] = jax.numpy.asarray(np.ascontiguousarray(a))
    return traverse_util.unflatten_dict(flat)


def to_openai_state_dict(params: Any, net: nn.Module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> reference state_dict (torch layouts, float32), in the reference's names."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for name, (path, layout, _) in name_map(net).items():
        out[prefix + name] = np.ascontiguousarray(
            to_torch_layout(layout, np.asarray(flat[path], np.float32))
        )
    return out


# Released networks by family name: (constructor, name prefix in the checkpoint file).
NETWORK_FAMILIES: dict[str, tuple[str, str]] = {
    "guided-diffusion-64": ("64x64_diffusion", ""),
    "guided-diffusion-128": ("128x128_diffusion", ""),
    "guided-diffusion-256": ("256x256_diffusion", ""),
    "guided-diffusion-256-uncond": ("256x256_diffusion_uncond", ""),
    "guided-diffusion-512": ("512x512_diffusion", ""),
    "guided-diffusion-classifier-64": ("64x64_classifier", ""),
    "guided-diffusion-classifier-128": ("128x128_classifier", ""),
    "guided-diffusion-classifier-256": ("256x256_classifier", ""),
    "guided-diffusion-classifier-512": ("512x512_classifier", ""),
    "sd-1.5": ("sd15", SD_UNET_PREFIX),
    "sd-2.1-v": ("sd21_v", SD_UNET_PREFIX),
    "sd-2-base": ("sd2_base", SD_UNET_PREFIX),
}


def family_network(family: str, dtype: Any = jnp.float32) -> nn.Module:
    """The Flax network of a released family name (NETWORK_FAMILIES)."""
    if family not in NETWORK_FAMILIES:
        raise ValueError(f"unknown network family {family!r}; valid: {sorted(NETWORK_FAMILIES)}")
    name, prefix = NETWORK_FAMILIES[family]
    if prefix == SD_UNET_PREFIX:
        return ldm_unet.released_unet(name, dtype=dtype)
    return openai_unet.released_model(name, dtype=dtype)


def sd_ema_state_dict(state_dict: dict[str, np.ndarray], net: nn.Module) -> dict[str, np.ndarray]:
    """The EMA U-Net of a CompVis checkpoint: 'model_ema.' + 'diffusion_model.<name>' without dots."""
    out, missing = {}, []
    for name in name_map(net):
        key = "model_ema." + f"diffusion_model.{name}".replace(".", "")  # ldm/modules/ema.py:18
        if key in state_dict:
            out[name] = state_dict[key]
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"checkpoint has no EMA weights for this U-Net: first missing key {missing[0]!r} "
            f"({len(missing)} missing)"
        )
    return out


def convert_checkpoint(
    state_dict: dict[str, np.ndarray], family: str, *, ema: bool = False, dtype: Any = jnp.float32
) -> tuple[nn.Module, dict]:
    """(network, params) of a released checkpoint's state_dict; names the first bad key.

    SD single-file checkpoints hold the U-Net under 'model.diffusion_model.' (ema=True reads
    the 'model_ema.' copy instead); guided-diffusion files are the bare state_dict.
    """
    net = family_network(family, dtype)
    prefix = NETWORK_FAMILIES[family][1]
    if ema:
        if not prefix:
            raise ValueError(f"ema=True applies to SD checkpoints; {family!r} has no EMA copy")
        return net, from_openai_state_dict(sd_ema_state_dict(state_dict, net), net, family=family)
    return net, from_openai_state_dict(state_dict, net, prefix=prefix, family=family)
