"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3 and App. C.3): snapshots and reconstruction.

During training each power-function EMA (std in ``config.ema.power_stds``) is written every
``config.ema.snapshot_every_kimg`` as ``<workdir>/phema_snapshots/phema-<nimg>-<std>.npz``
(reference layout: ``config_json`` + ``param/<name>``, float16 by default as NVlabs/edm2).
``reconstruct`` solves the least-squares coefficients (Algorithm 3, float64) and writes, per
target std, ``<workdir>/phema/phema-<nimg>-<std>.npz``, loadable with ``edm_jax.load``::

    python -m edm_jax.train.phema --workdir W --std 0.05 0.10 0.15
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edm_jax.cadence import crossed
from edm_jax.train.state import exp_to_std, std_to_exp

__all__ = [
    "MAX_STD",
    "check_targets",
    "exp_to_std",
    "std_to_exp",
    "Snapshot",
    "list_snapshots",
    "power_function_beta",
    "power_function_correlation",
    "power_function_response",
    "reconstruct",
    "reconstruct_params",
    "save_snapshot",
    "solve_posthoc_coefficients",
]

MAX_STD = math.sqrt(1 / 12)  # std of the gamma -> 0 profile; larger stds have no power profile
SNAPSHOT_DIR, OUTPUT_DIR = "phema_snapshots", "phema"
_NAME = re.compile(r"phema-(\d+)-(\d+\.\d+)\.npz")


def _exps(std) -> np.ndarray:
    """std_to_exp elementwise over an array of stds (float64)."""
    std = np.asarray(std, np.float64)
    return np.asarray([std_to_exp(s) for s in std.reshape(-1)], np.float64).reshape(std.shape)


def power_function_beta(std: float, t_next: float, t_delta: float) -> float:
    """EMA decay tracking the power profile of `std`: (1 - t_delta / t_next)^(gamma + 1) (eq. 127)."""
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """Inner products of power-function EMA profiles (eq. 151), broadcast, float64."""
    a_ofs, b_ofs = np.asarray(a_ofs, np.float64), np.asarray(b_ofs, np.float64)
    a_exp, b_exp = _exps(a_std), _exps(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio**t_exp
    return num / ((a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs))


def power_function_response(ofs, std, length: int, axis: int = 0) -> np.ndarray:
    """Normalised response of power-function EMA profiles over t = 0..length-1 (eqs. 121, 108)."""
    ofs, std = np.broadcast_arrays(np.float64(ofs), np.float64(std))
    ofs, exp = np.stack([ofs], axis=axis), np.stack([_exps(std)], axis=axis)
    shape = [1] * exp.ndim
    shape[axis] = -1
    t = np.arange(length).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        resp = np.where(t <= ofs, (t / ofs) ** exp, 0) / ofs * (exp + 1)
    return resp / np.sum(resp, axis=axis, keepdims=True)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Coefficients X [len(in), len(out)] (columns sum to 1) of Algorithm 3, in float64."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))

    def rv(x):
        return x.reshape(-1, 1)

    def cv(x):
        return x.reshape(1, -1)

    A = power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    B = power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    X = np.linalg.solve(A, B)
    return X / np.sum(X, axis=0)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One power-EMA snapshot file: its path, training images seen, and profile std."""

    path: str
    nimg: int
    std: float


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file in path's folder, then os.replace (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def snapshot_name(nimg: int, std: float) -> str:
    """File name of the snapshot (or reconstruction) at nimg images with profile std."""
    return f"phema-{int(nimg):012d}-{std:.3f}.npz"


def save_snapshot(
    workdir: str | os.PathLike, nimg: int, std: float, params: Any, model, dtype: str = "float16"
) -> Path:
    """Write one power-EMA's params as a reference .npz (trained arrays cast to dtype)."""
    from flax import traverse_util

    from edm_jax.nets.convert import reference_config, to_state_dict, torch_name
    from edm_jax.nets.model import is_buffer

    sd = to_state_dict(params, model)
    prefix = getattr(model.net, "state_dict_prefix", "model.")
    flat = traverse_util.flatten_dict(params)
    trained = {prefix + torch_name(k) for k in flat if not is_buffer(k)}
    arrays = {f"param/{k}": v.astype(dtype) if k in trained else v for k, v in sd.items()}
    meta = {"nimg": int(nimg), "std": float(std), "buffers": sorted(set(sd) - trained)}
    arrays["config_json"] = np.asarray(json.dumps(reference_config(model)))
    arrays["phema_json"] = np.asarray(json.dumps(meta))
    path = Path(workdir) / SNAPSHOT_DIR / snapshot_name(nimg, std)
    _write_npz_atomic(path, arrays)
    return path


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Snapshots in a folder, sorted by (nimg, std) as reconstruct_phema.py lists them."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no snapshot folder {directory}")
    out = []
    for name in os.listdir(directory):
        if m := _NAME.fullmatch(name):
            out.append(Snapshot(os.path.join(directory, name), int(m.group(1)), float(m.group(2))))
    return sorted(out, key=lambda s: (s.nimg, s.std))


def check_targets(snapshots: Sequence[Snapshot], out_std: Sequence[float], out_nimg) -> tuple:
    """(inputs with 0 < nimg <= out_nimg, out_nimg, sorted stds); ValueError before any compute."""
    if not snapshots:
        raise ValueError(
            "no power-EMA snapshots to reconstruct from (set ema.power_stds and "
            "ema.snapshot_every_kimg when training)"
        )
    bad = [s for s in out_std if not 0 < s < MAX_STD]
    if bad or not out_std:
        raise ValueError(
            f"target std {bad or out_std} outside (0, {MAX_STD:.4f}): no power-"
            "function EMA profile has it"
        )
    nimgs = sorted({s.nimg for s in snapshots})
    if out_nimg is None:
        out_nimg = nimgs[-1]
    elif out_nimg not in nimgs:
        raise ValueError(f"out_nimg {out_nimg} is not a snapshot time; valid: {nimgs}")
    inputs = [s for s in snapshots if 0 < s.nimg <= out_nimg]
    if not inputs:
        raise ValueError(f"no snapshot with 0 < nimg <= {out_nimg} (found nimg {nimgs})")
    return inputs, int(out_nimg), sorted(set(float(s) for s in out_std))


def reconstruct_params(
    inputs: Sequence[Snapshot],
    out_nimg: int,
    out_std: Sequence[float],
    load,
    acc_dtype: Any = np.float32,
    cast_back: bool = True,
) -> tuple[np.ndarray, list[dict]]:
    """(coefs [in, out], one dict per std): sum_i coef_ij snapshot_i, in input order.

    ``load(snapshot) -> (arrays by name, buffer names)``; buffers are copied from the last
    input, the rest accumulated in acc_dtype (float32, as reconstruct_phema.py) and cast back
    to the snapshots' dtype if cast_back.
    """
    coefs = solve_posthoc_coefficients(
        [s.nimg for s in inputs], [s.std for s in inputs], out_nimg, out_std
    )
    outs: list[dict] = [{} for _ in out_std]
    dtypes: dict = {}
    for i, snap in enumerate(inputs):
        arrays, buffers = load(snap)
        for j, out in enumerate(outs):
            for k, v in arrays.items():
                if k in buffers:
                    out[k] = v
                    continue
                dtypes[k] = v.dtype
                acc = out.get(k, np.zeros(v.shape, acc_dtype))
                out[k] = acc + v.astype(acc_dtype) * acc_dtype(coefs[i, j])
    if not cast_back:
        return coefs, outs
    return coefs, [{k: v.astype(dtypes.get(k, v.dtype)) for k, v in o.items()} for o in outs]


def _load_npz(snap: Snapshot) -> tuple[dict, set]:
    """(param arrays by name, buffer names) of a snapshot file."""
    with np.load(snap.path) as d:
        meta = json.loads(str(d["phema_json"]))
        arrays = {k[len("param/") :]: d[k] for k in d.files if k.startswith("param/")}
    return arrays, set(meta["buffers"])


def reconstruct(
    workdir: str | os.PathLike,
    out_std: Sequence[float],
    out_nimg: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Post-hoc EMA of a training run for each std in out_std; returns the written .npz paths."""
    snaps = list_snapshots(Path(workdir) / SNAPSHOT_DIR)
    inputs, out_nimg, stds = check_targets(snaps, out_std, out_nimg)
    _, outs = reconstruct_params(inputs, out_nimg, stds, _load_npz)
    with np.load(inputs[-1].path) as d:
        config_json = d["config_json"]
    out_dir = Path(out_dir) if out_dir is not None else Path(workdir) / OUTPUT_DIR
    paths = []
    for std, arrays in zip(stds, outs, strict=True):
        meta = {"nimg": out_nimg, "std": std, "inputs": [os.path.basename(s.path) for s in inputs]}
        path = out_dir / snapshot_name(out_nimg, std)
        data = {f"param/{k}": v for k, v in arrays.items()}
        _write_npz_atomic(
            path, {**data, "config_json": config_json, "phema_json": np.asarray(json.dumps(meta))}
        )
        paths.append(path)
    return paths


def maybe_save_snapshots(workdir, model, state, config, step: int) -> list[Path]:
    """Training hook: after `step`, write every power EMA if a snapshot interval was crossed."""
    every = config.ema.get("snapshot_every_kimg", 0)
    if not every or not config.ema.power_stds:
        return []
    bs = config.train.batch_size
    if not crossed(step, step - 1, bs, every):
        return []
    import jax

    dtype = config.ema.get("snapshot_dtype", "float16")
    emas = jax.device_get(state.power_ema)
    return [
        save_snapshot(workdir, step * bs, std, ema, model, dtype)
        for std, ema in zip(config.ema.power_stds, emas, strict=True)
    ]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line: reconstruct one or more stds from a run's snapshots."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training run folder (holds phema_snapshots/)")
    p.add_argument("--std", type=float, nargs="+", required=True, help="target relative stds")
    p.add_argument("--nimg", type=int, default=None, help="snapshot time (default: the last)")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/phema)")
    args = p.parse_args(argv)
    paths = reconstruct(args.workdir, args.std, args.nimg, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
