"""Weights between k-diffusion state_dicts (torch layouts) and our Flax params.

Names: the Flax path joined by '.' with list indices split off (``down_levels_0_1/ff/up_proj/
kernel`` <-> ``down_levels.0.1.ff.up_proj.weight``). Layouts: Linear kernels [in, out] <->
[out, in], conv kernels HWIO <-> OIHW, ``nn.Embed`` ``embedding`` <-> ``weight``; the Fourier
buffer (leaf ``freqs``) <-> ``weight`` as stored. Derived buffers (HDiT ``pos_emb.freqs``,
image_v1 resampler ``kernel``) are checked on the way in and written on the way out.
The first mismatching keys are named before anything is converted.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "freqs": "weight"}


def torch_name(path: tuple[str, ...]) -> str:
    """Reference state_dict name (without prefix) of a Flax params path."""
    *mods, leaf = path
    mods = [re.sub(r"_(\d+)", r".\1", m) for m in mods]
    return ".".join([*mods, _LEAF_NAMES.get(leaf, leaf)])


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


def param_template(model) -> dict:
    """Flattened {path: ShapeDtypeStruct} of the model's parameters (no compute)."""
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    return traverse_util.flatten_dict(shapes)


def _same_buffer(have: np.ndarray, value: np.ndarray) -> bool:
    """Whether a stored buffer equals the derived one, after rounding to the stored dtype (fp16)."""
    if have.shape != value.shape:
        return False
    want = value.astype(have.dtype).astype(np.float32)
    return bool(np.allclose(have.astype(np.float32), want, rtol=1e-5, atol=1e-6))


def _problems(state_dict, template, buffers, prefix) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped or wrong-valued) reference names."""
    missing, bad = [], []
    for path, leaf in template.items():
        name = prefix + torch_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        got = from_torch_layout(path, np.asarray(state_dict[name])).shape
        if got != leaf.shape:
            want = to_torch_layout(path, np.zeros(leaf.shape, np.int8)).shape
            bad.append(f"{name} {tuple(np.shape(state_dict[name]))} != {want}")
    for name, value in buffers.items():
        have = state_dict.get(prefix + name)
        if have is not None and not _same_buffer(np.asarray(have), value):
            bad.append(f"{prefix + name} (buffer differs from the configuration's)")
    used = {prefix + torch_name(p) for p in template} | {prefix + b for b in buffers}
    return missing, sorted(set(state_dict) - used), bad


def _report(missing: list, extra: list, bad: list) -> None:
    """Raise one ValueError naming the first missing, unexpected and mis-shaped keys."""
    parts = []
    for what, keys in (
        ("missing", missing),
        ("unexpected", extra),
        ("mis-shaped or wrong-valued", bad),
    ):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {what}: {', '.join(map(str, keys[:5]))}{more}")
    if parts:
        raise ValueError("k-diffusion state_dict does not match the model: " + "; ".join(parts))


def from_state_dict(state_dict: dict[str, np.ndarray], model, *, prefix: str = "") -> dict:
    """k-diffusion state_dict (name -> array, torch layouts) -> float32 Flax params of `model`.

    `prefix` is 'inner_model.' for a KarrasAugmentWrapper'd image_v1 training state_dict.
    Raises ValueError naming missing, unexpected and mis-shaped keys before converting.
    """
    template = param_template(model)
    _report(*_problems(state_dict, template, model.reference_buffers(), prefix))
    out = {
        p: jax.numpy.asarray(
            from_torch_layout(p, np.asarray(state_dict[prefix + torch_name(p)], np.float32))
        )
        for p in template
    }
    return traverse_util.unflatten_dict(out)


def to_state_dict(params: Any, model, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> k-diffusion state_dict (torch layouts, float32) with derived buffers."""
    flat = traverse_util.flatten_dict(params)
    sd = {
        prefix + torch_name(k): to_torch_layout(k, np.asarray(v, np.float32))
        for k, v in flat.items()
    }
    sd.update({prefix + k: v for k, v in model.reference_buffers().items()})
    return sd
