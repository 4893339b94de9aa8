"""k-diffusion's checkpoint files: read without torch, and our runs written for k-diffusion.

- Training checkpoints (``train.py``'s ``.pth``: ``model``, ``model_ema``, ``config``, the
  optimiser and schedulers' state, ...) are read as data by the restricted reader; the EMA
  weights (``ema=False``: the trained ones) and the config they hold give the model.
- Inference checkpoints (``convert_for_inference.py``'s ``.safetensors``: the EMA state_dict
  in fp16 with the config JSON in its metadata).
- ``export(workdir or (model, params), path)`` writes our run of a k-diffusion network in the
  inference format, loadable by ``K.config.load_config`` + ``K.config.make_model``.

``load(path)`` returns ``(model, params, config)`` as ``edm_jax.load`` does; ``is_kdiff_file``
tells these files from other checkpoints by their contents (a 'config' in the safetensors
metadata; 'config' + 'model_ema' in a pickle).

    python -m edm_jax.nets.kdiff_files export --workdir runs/x --out x.safetensors [--dtype fp32]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from edm_jax.nets import convert_kdiff, reader
from edm_jax.nets.kdiff_models import (
    KDiffusionModel,
    from_inference,
    make_model,
    state_dict_prefix,
    to_inference,
)

__all__ = ["export", "is_kdiff_file", "load", "main"]

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt")
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def _safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors header (the tensors are not read)."""
    with open(path, "rb") as f:  # the reader's own header parser (checks included)
        header, _ = reader._safetensors_header(f, path, os.path.getsize(path))  # noqa: SLF001
    return header.get("__metadata__", {}) or {}


def is_kdiff_file(path: str | os.PathLike) -> bool:
    """True for a k-diffusion inference .safetensors or training .pth (by what it holds)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".safetensors"):
        try:
            return "config" in _safetensors_metadata(path)
        except (ValueError, OSError):
            return False
    if path.lower().endswith(PICKLE_SUFFIXES):
        try:
            tree = reader.read_checkpoint(path)
        except (ValueError, OSError):
            return False
        return isinstance(tree, dict) and "config" in tree and "model_ema" in tree
    return False


def _from_training_checkpoint(path: str, ema: bool) -> tuple[dict, Any, dict]:
    """(config, network, params) of k-diffusion train.py's .pth."""
    from edm_jax.nets.kdiff_config import load_config

    tree = reader.read_checkpoint(path)
    if not isinstance(tree, dict) or "config" not in tree or "model_ema" not in tree:
        keys = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"{path} is not a k-diffusion training checkpoint (it needs 'config' and "
            f"'model_ema'); it holds {keys}"
        )
    config = load_config(tree["config"])
    flat: dict[str, np.ndarray] = {}
    reader._flatten(tree["model_ema" if ema else "model"], "", flat, [1 << 20])  # noqa: SLF001
    net = make_model(config)
    return config, net, convert_kdiff.from_state_dict(flat, net, prefix=state_dict_prefix(config))


def load(path: str | os.PathLike, ema: bool = True) -> tuple[KDiffusionModel, Any, dict]:
    """(model, float32 params, config) of a k-diffusion .pth or inference .safetensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.lower().endswith(".safetensors"):
        config, net, params = from_inference(*reader.read_safetensors(path))
    elif path.lower().endswith(PICKLE_SUFFIXES):
        config, net, params = _from_training_checkpoint(path, ema)
    else:
        raise ValueError(
            f"{path}: a k-diffusion checkpoint is a .safetensors or {'/'.join(PICKLE_SUFFIXES)}"
        )
    return KDiffusionModel(net, config), params, config


def export(source: Any, path: str | os.PathLike, dtype: str = "fp16") -> str:
    """Write a run of a k-diffusion network as convert_for_inference.py's .safetensors.

    ``source``: a training workdir (its newest checkpoint's EMA) or ``(model, params)``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not valid; valid: {sorted(DTYPES)}")
    if isinstance(source, (str, os.PathLike)):
        from edm_jax.checkpoint_reader import load_checkpoint

        model, params, _ = load_checkpoint(os.fspath(source))
    else:
        model, params = source
    if not isinstance(model, KDiffusionModel):
        raise ValueError(
            f"{source if isinstance(source, str) else 'the model'} is not a k-diffusion "
            "network (a run of a k-diffusion JSON config); only those export to its format"
        )
    tensors, metadata = to_inference(params, model.net, model.config, DTYPES[dtype])
    reader.write_safetensors(path, tensors, metadata)
    return os.fspath(path)


def main(argv: list[str] | None = None) -> int:
    """``export --workdir W --out X.safetensors [--dtype fp16|fp32]``; one error line, exit 2."""
    p = argparse.ArgumentParser(prog="python -m edm_jax.nets.kdiff_files")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="our run -> k-diffusion's inference .safetensors")
    e.add_argument("--workdir", required=True, help="training run of a k-diffusion config")
    e.add_argument("--out", required=True, help="the .safetensors to write")
    e.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.dtype)
    except (ValueError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
