"""Detector weights as torch state_dicts: read them (.pth or .npz of torch names) into Flax params.

Torch files are read as data by ``edm_jax.nets.reader`` (no torch). Layouts: conv OIHW <-> HWIO,
linear [out, in] <-> [in, out]; ``num_batches_tracked`` buffers are ignored. The command line
that exports them to .npz is ``edm_jax.metrics.convert_weights``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from edm_jax.nets import reader

_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_PART = {"patch_embed_proj": "patch_embed.proj"}
IGNORED_SUFFIX = ".num_batches_tracked"


def torch_name(path: tuple[str, ...]) -> str:
    """Torch state_dict name of a Flax params path (``blocks_3/attn/qkv/kernel`` -> ``blocks.3.attn.qkv.weight``)."""
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", _PART.get(p, p)) for p in path[:-1]]
    leaf = _LEAF.get(path[-1], path[-1]) if len(path) > 1 else path[-1]
    return ".".join([*parts, leaf])


def from_torch_layout(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout (conv OIHW -> HWIO, linear [out, in] -> [in, out])."""
    if path[-1] == "kernel":
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    return a


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf of this shape."""
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return tuple(shape)


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], template: Any, *, source: str = "state_dict"
) -> dict:
    """Torch state_dict -> float32 Flax params shaped as ``template`` (a params pytree of shapes).

    Every key is checked; a ValueError names the first missing, unexpected or mis-shaped key.
    """
    flat = traverse_util.flatten_dict(template)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIX)}
    names = {torch_name(p): p for p in flat}
    missing = [n for n in names if n not in sd]
    extra = sorted(k for k in sd if k not in names)
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}" + _more(missing))
    if extra:
        problems.append(f"unexpected key {extra[0]!r}" + _more(extra))
    for name, path in names.items():
        want = _torch_shape(path, tuple(flat[path].shape))
        if name in sd and tuple(np.shape(sd[name])) != want:
            problems.append(f"key {name!r} has shape {tuple(np.shape(sd[name]))}, expected {want}")
            break
    if problems:
        raise ValueError(f"{source} does not match the network: " + "; ".join(problems))
    out = {p: from_torch_layout(p, np.asarray(sd[n], np.float32)) for n, p in names.items()}
    return jax.device_put(traverse_util.unflatten_dict(out))


def _more(keys: list) -> str:
    """' (and N more)' when a list of bad keys has more than one entry."""
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> array of a .npz (torch names, or ``param/<name>``) or a torch file (no torch needed)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if any(k.startswith("param/") for k in z.files):
                return {k[6:]: z[k] for k in z.files if k.startswith("param/")}
            return {k: z[k] for k in z.files}
    if path.endswith(_TORCH_SUFFIXES):
        # read as data by the restricted reader; a checkpoint's 'state_dict' is found inside
        return {k: np.asarray(v, np.float32) for k, v in reader.read_state_dict(path).items()}
    raise ValueError(
        f"weights file {path!r}: unknown extension; valid: .npz, {', '.join(_TORCH_SUFFIXES)}"
    )
