"""Weights between NVlabs/edm state_dicts (torch layouts) and our Flax params.

Names: Flax ``enc_16x16_block0/conv0/kernel`` <-> torch ``model.enc.16x16_block0.conv0.weight``.
Layouts: conv kernels HWIO <-> OIHW, linear kernels [in, out] <-> [out, in]; GroupNorm
``scale`` <-> ``weight``. Buffers (resample filters, iDDPM ``u``) are derived from the
configuration: checked on the way in, written on the way out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from edm_jax.nets.model import DiffusionModel, init_net
from edm_jax.nets.presets import NETS, assemble_model
from edm_jax.precond import PRECONDS, IDDPMPrecond, get_precond

PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
PRECOND_NAMES["Precond"] = "edm"  # NVlabs/edm2 networks_edm2.Precond: EDM scalings + logvar
REFERENCE_NETS = {"Precond": "EDM2UNet"}  # reference precond classes that fix the network
PRECOND_FIELDS = (
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "beta_d",
    "beta_min",
    "M",
    "epsilon_t",
    "C_1",
    "C_2",
)
DEFAULT_NET = {"edm": "DhariwalUNet", "vp": "SongUNet", "ve": "SongUNet", "iddpm": "DhariwalUNet"}
_IGNORED = (
    "precond",
    "model_type",
    "num_params",
    "layout",
    "use_fp16",
    "img_resolution",
    "img_channels",
    "label_dim",
    "augment_dim",
    "module",  # descriptive keys of an exported config (edm2 fixtures)
    "mode",
    "seed",
    "torch",
    "reference",
    "train_forward",
)
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "freqs": "freqs",
    "null": "null",
}


def torch_name(path: tuple[str, ...]) -> str:
    """Reference state_dict name (without prefix) of a Flax params path."""
    first, *rest = path
    if first[:4] in ("enc_", "dec_"):
        first = f"{first[:3]}.{first[4:]}"
    return ".".join([first, *rest[:-1], _LEAF_NAMES.get(rest[-1] if rest else first, rest[-1])])


def to_torch_layout(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """Flax array -> torch layout (HWIO -> OIHW, [in, out] -> [out, in])."""
    if path[-1] == "kernel":
        return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    return a


def from_torch_layout(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """Torch array -> Flax layout (OIHW -> HWIO, [out, in] -> [in, out])."""
    if path[-1] == "kernel":
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    return a


def _unpack(model_or_module, prefix: str | None) -> tuple[nn.Module, str, dict[str, np.ndarray]]:
    """(network, name prefix, expected buffers by full name) of a DiffusionModel or a bare net."""
    if isinstance(model_or_module, DiffusionModel):
        net = model_or_module.net
        if prefix is None:  # the reference Precond's name for its network (EDM2: none)
            prefix = getattr(net, "state_dict_prefix", "model.")
        buffers = {prefix + k: v for k, v in net.reference_buffers().items()}
        if isinstance(model_or_module.precond, IDDPMPrecond):
            buffers["u"] = model_or_module.precond.u.astype(np.float32)
        return net, prefix, buffers
    if isinstance(model_or_module, nn.Module):
        prefix = "" if prefix is None else prefix
        return (
            model_or_module,
            prefix,
            {prefix + k: v for k, v in model_or_module.reference_buffers().items()},
        )
    raise ValueError(
        f"expected a DiffusionModel or a Flax network; got {type(model_or_module).__name__}"
    )


def _report(missing: list, extra: list, bad: list) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key."""
    parts = []
    for what, keys in (
        ("missing keys", missing),
        ("unexpected keys", extra),
        ("mis-shaped or wrong-valued", bad),
    ):
        if keys:
            parts.append(
                f"{len(keys)} {what}: {', '.join(map(str, keys[:20]))}{' ...' if len(keys) > 20 else ''}"
            )
    if parts:
        raise ValueError("state_dict does not match the model: " + "; ".join(parts))


def from_state_dict(
    state_dict: dict[str, np.ndarray], model_or_module, *, prefix: str | None = None
) -> dict:
    """Reference state_dict (name -> array, torch layouts) -> float32 Flax params.

    prefix defaults to 'model.' for a DiffusionModel (the reference's *Precond wrapper) and
    '' for a bare network. Raises ValueError naming missing, extra and mis-shaped keys.
    """
    net, prefix, buffers = _unpack(model_or_module, prefix)
    template = traverse_util.flatten_dict(
        jax.eval_shape(functools.partial(init_net, net), jax.random.key(0))
    )
    missing, bad, out = [], [], {}
    for path, leaf in template.items():
        name = prefix + torch_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        a = from_torch_layout(path, np.asarray(state_dict[name], np.float32))
        if a.shape != leaf.shape:
            want = to_torch_layout(path, np.zeros(leaf.shape, np.int8)).shape
            bad.append(f"{name} {tuple(np.shape(state_dict[name]))} != {want}")
            continue
        out[path] = a
    for name, value in buffers.items():
        rtol = 2e-3 if name == "u" else 1e-5  # the reference accumulates u in float32
        if name in state_dict and not np.allclose(state_dict[name], value, rtol=rtol, atol=1e-6):
            bad.append(f"{name} (buffer differs from the configuration's)")
    used = {prefix + torch_name(p) for p in template} | set(buffers)
    _report(missing, sorted(set(state_dict) - used), bad)
    return traverse_util.unflatten_dict({k: jax.numpy.asarray(v) for k, v in out.items()})


def to_state_dict(
    params: Any, model_or_module=None, *, prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Flax params -> reference state_dict (torch layouts, float32), with buffers if a model is given."""
    buffers: dict[str, np.ndarray] = {}
    if model_or_module is not None:
        _, prefix, buffers = _unpack(model_or_module, prefix)
    prefix = "" if prefix is None else prefix
    flat = traverse_util.flatten_dict(params)
    sd = {
        prefix + torch_name(k): to_torch_layout(k, np.asarray(v, np.float32))
        for k, v in flat.items()
    }
    return {**sd, **{k: np.asarray(v) for k, v in buffers.items()}}


def load_reference_npz(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, state_dict) of an .npz laid out as the fixtures: config_json, param/<name>."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference npz not found: {path}")
    with np.load(path) as data:
        if "config_json" not in data.files:
            raise ValueError(f"{path}: no 'config_json' entry; keys: {data.files[:10]}")
        config = json.loads(str(data["config_json"]))
        sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    return config, sd


def model_from_reference_config(config: dict, **options) -> DiffusionModel:
    """DiffusionModel matching a reference constructor config ({'precond': 'EDMPrecond', ...})."""
    pname = config.get("precond", "EDMPrecond")
    if pname not in PRECOND_NAMES:
        raise ValueError(f"unknown reference precond {pname!r}; valid: {sorted(PRECOND_NAMES)}")
    name = PRECOND_NAMES[pname]
    valid = {f.name for f in dataclasses.fields(PRECONDS[name])}
    precond = get_precond(
        name, **{k: config[k] for k in PRECOND_FIELDS if k in config and k in valid}
    )
    net_cls = NETS.get(config.get("model_type", REFERENCE_NETS.get(pname, DEFAULT_NET[name])))
    if net_cls is None:
        raise ValueError(f"unknown model_type {config['model_type']!r}; valid: {sorted(NETS)}")
    skip = set(_IGNORED) | set(PRECOND_FIELDS)
    fields = {k: v for k, v in config.items() if k not in skip}
    return assemble_model(
        net_cls,
        precond,
        img_resolution=config["img_resolution"],
        img_channels=config["img_channels"],
        label_dim=config.get("label_dim", 0),
        augment_dim=config.get("augment_dim", 0),
        **fields,
        **options,
    )


def load_reference(path: str | os.PathLike, **options) -> tuple[DiffusionModel, dict]:
    """(model, params) from a reference .npz (config_json + param/<name> state_dict)."""
    config, sd = load_reference_npz(path)
    model = model_from_reference_config(config, **options)
    return model, from_state_dict(sd, model)


def reference_config(model: DiffusionModel) -> dict:
    """A config_json that model_from_reference_config turns back into this model (plain ones)."""
    if model.self_cond or model.patch_size != 1:
        raise ValueError("reference_config supports models without self_cond and patching")
    net = model.net
    pname = {v: k for k, v in REFERENCE_NETS.items()}.get(type(net).__name__)
    if pname is None:
        pname = {v: k for k, v in PRECOND_NAMES.items() if k != "Precond"}[
            next(n for n, c in PRECONDS.items() if isinstance(model.precond, c))
        ]
    skip = {"img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "dtype"}
    fields = {
        f.name: getattr(net, f.name)
        for f in dataclasses.fields(net)
        if f.name not in skip | {"parent", "name"}
    }
    precond = {f.name: getattr(model.precond, f.name) for f in dataclasses.fields(model.precond)}
    return {
        "precond": pname,
        "model_type": type(net).__name__,
        "img_resolution": model.img_resolution,
        "img_channels": model.img_channels,
        "label_dim": model.label_dim,
        "augment_dim": model.augment_dim,
        **{k: v for k, v in precond.items() if k in PRECOND_FIELDS},
        **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
    }
