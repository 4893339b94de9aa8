"""Reference statistics files: NVlabs/edm ``fid-refs/*.npz`` and edm2 ``dataset-refs/*.pkl``.

In memory a reference is ``{metric: {'mu': [D], 'sigma': [D, D]}}`` (float64), as edm2
stores it (``'fid'`` for Inception-v3, ``'fd_dinov2'`` for DINOv2), plus ``{'kid':
{'features': [N, D]}}`` when the Inception features were kept for KID.

- ``.npz`` (edm): ``mu`` and ``sigma`` are the FID statistics; ``fd_dinov2_mu`` /
  ``fd_dinov2_sigma`` and ``kid_features`` are edm_jax's additions.
- ``.pkl`` (edm2): the pickled dict itself, read as plain data by ``restricted_pickle``
  (NumPy arrays in plain containers; anything that would run code is refused).

Files are written to a temp file beside the target and renamed over it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edm_jax import restricted_pickle

__all__ = ["FRECHET_METRICS", "check_ref", "load_ref", "save_ref"]

FRECHET_METRICS = ("fid", "fd_dinov2", "fd_clip")
_NPZ_KEYS = {("fid", "mu"): "mu", ("fid", "sigma"): "sigma",
             ("fd_dinov2", "mu"): "fd_dinov2_mu", ("fd_dinov2", "sigma"): "fd_dinov2_sigma",
             ("fd_clip", "mu"): "fd_clip_mu", ("fd_clip", "sigma"): "fd_clip_sigma",
             ("kid", "features"): "kid_features"}  # fmt: skip
SUFFIXES = (".npz", ".pkl")


def _check_suffix(path: Path) -> None:
    """Raise ValueError unless path ends in .npz or .pkl."""
    if path.suffix not in SUFFIXES:
        raise ValueError(f"reference file {path} must end in one of {list(SUFFIXES)}")


def _numeric(value, where: str) -> np.ndarray:
    """value as a numeric ndarray (float64 for statistics), else ValueError."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise ValueError(f"{where} must be a numeric array, got {type(value).__name__}")
    return value


def _from_pkl(data, path: Path) -> dict:
    """The metric dicts of an unpickled edm2 reference, checked to be arrays."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of metrics, got {type(data).__name__}")
    ref = {}
    for metric, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {metric!r} must be a dict of arrays")
        ref[str(metric)] = {str(k): _numeric(v, f"{path}: {metric}.{k}") for k, v in entry.items()}
    return ref


def load_ref(path) -> dict[str, dict[str, np.ndarray]]:
    """Read a reference .npz (edm) or .pkl (edm2) as ``{metric: {'mu', 'sigma'}}``."""
    path = Path(os.fspath(path))
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path}; compute them with "
            "`python -m edm_jax.metrics ref` or download NVlabs/edm fid-refs / edm2 dataset-refs"
        )
    if path.suffix == ".pkl":
        return _from_pkl(restricted_pickle.loads(path.read_bytes(), source=str(path)), path)
    ref: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as f:
        for (metric, key), name in _NPZ_KEYS.items():
            if name in f:
                ref.setdefault(metric, {})[key] = _numeric(f[name], f"{path}: {name}")
    if not ref:
        raise ValueError(f"{path} holds none of {sorted(_NPZ_KEYS.values())}")
    return ref


def _serialise(ref: dict, suffix: str, f) -> None:
    """Write ref into the open binary file f in the format of suffix."""
    if suffix == ".pkl":
        plain = {m: {k: np.asarray(v) for k, v in e.items()} for m, e in ref.items()}
        pickle.dump(plain, f, protocol=4)
        return
    arrays: dict[str, Any] = {}
    for metric, entry in ref.items():
        for key, value in entry.items():
            if (metric, key) not in _NPZ_KEYS:
                raise ValueError(f"a reference .npz cannot hold {metric}.{key}")
            arrays[_NPZ_KEYS[metric, key]] = np.asarray(value)
    np.savez(f, **arrays)


def save_ref(path, ref: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write ref to path (.npz or .pkl) atomically: temp file beside it, then os.replace."""
    path = Path(os.fspath(path))
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _serialise(ref, path.suffix, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def check_ref(ref: dict, metric: str, dim: int, path) -> None:
    """Raise ValueError unless ref holds metric's statistics (or KID features) of size dim."""
    if metric == "kid":
        feats = ref.get("kid", {}).get("features")
        if feats is None:
            raise ValueError(
                f"{path} has no Inception features for KID; recompute it with "
                "`python -m edm_jax.metrics ref --kid-features` (.npz key kid_features)"
            )
        if feats.ndim != 2 or feats.shape[1] != dim or len(feats) < 2:
            raise ValueError(f"{path}: kid_features must be [N >= 2, {dim}], got {feats.shape}")
        return
    entry = ref.get(metric)
    if entry is None or "mu" not in entry or "sigma" not in entry:
        have = sorted(m for m, e in ref.items() if "mu" in e)
        raise ValueError(f"{path} has no {metric!r} statistics (mu, sigma); it has {have}")
    mu, sigma = entry["mu"], entry["sigma"]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"{path}: {metric} statistics are of size mu {mu.shape}, sigma {sigma.shape}, but "
            f"the detector gives {dim} features; valid: mu ({dim},), sigma ({dim}, {dim})"
        )
