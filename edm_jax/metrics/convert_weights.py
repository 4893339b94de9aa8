"""Detector weights: torch state_dicts (.pth, or .npz of torch names) <-> Flax params.

Command line (torch is not needed: .pth files are read as data by ``edm_jax.nets.reader``):

    python -m edm_jax.metrics.convert_weights inception pt_inception-2015-12-05-6726825d.pth inception.npz
    python -m edm_jax.metrics.convert_weights dinov2 dinov2_vitl14_pretrain.pth dinov2_vitl14.npz

The .npz holds the state_dict under its torch names (float32, torch layouts); every key is
checked against the network before it is written. ``num_batches_tracked`` buffers are dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from edm_jax.metrics.state_dict import (
    IGNORED_SUFFIX,
    from_torch_layout,
    params_from_state_dict,
    read_state_dict,
    torch_name,
)

__all__ = [
    "convert",
    "from_torch_layout",
    "main",
    "params_from_state_dict",
    "read_state_dict",
    "torch_name",
    "write_npz",
]


def write_npz(state_dict: Mapping[str, np.ndarray], out: str | os.PathLike) -> None:
    """Write name -> float32 array to ``out`` atomically (temp file + os.replace)."""
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
    try:
        arrays: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert(name: str, src: str | os.PathLike, out: str | os.PathLike) -> int:
    """Check ``src`` (.pth or .npz) against detector ``name`` and write its state_dict to ``out``.

    Returns the number of parameter values written.
    """
    from edm_jax.metrics.detectors import load_detector

    load_detector(name, src)  # raises on any missing, unexpected or mis-shaped key
    sd = {k: v for k, v in read_state_dict(src).items() if not k.endswith(IGNORED_SUFFIX)}
    write_npz(sd, out)
    return int(sum(np.size(v) for v in sd.values()))


def main(argv: list[str] | None = None) -> int:
    """Command line: convert_weights {inception,dinov2} IN.pth OUT.npz."""
    from edm_jax.metrics.detectors import DETECTORS

    parser = argparse.ArgumentParser(
        prog="python -m edm_jax.metrics.convert_weights",
        description="Check a detector's torch weights and export them to .npz (torch names).",
    )
    parser.add_argument("name", choices=sorted(DETECTORS))
    parser.add_argument("src", help="state_dict: .pth / .pt / .safetensors or .npz")
    parser.add_argument("out", help="output .npz")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.src):
        parser.error(f"input file not found: {args.src}")
    n = convert(args.name, args.src, args.out)
    print(f"wrote {args.out}: {args.name} weights, {n:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
