"""Command line: reference statistics, generate-and-score, score images.

python -m edm_jax.metrics ref  --data zip --path cifar10-32x32.zip --resolution 32 --dest cifar10.npz
python -m edm_jax.metrics gen  --reference-npz edm-cifar10-32x32-cond-vp.npz --ref cifar10.npz
python -m edm_jax.metrics gen  --workdir runs/cifar --ref cifar10.npz --protocol nvidia
python -m edm_jax.metrics calc --images samples/samples.npz --ref cifar10.npz

Weights: --inception-weights / --dinov2-weights / --clip-weights (fd_clip) (default: $EDM_JAX_WEIGHTS or ~/.cache/edm_jax).
Each result is printed and appended as one JSON line to --results (default metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from edm_jax.metrics import evaluate as ev
from edm_jax.metrics import refs


def _seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (as sample.py and NVlabs/edm)."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: expected e.g. '0-49999'")
        seeds.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return seeds


def _metrics(text: str) -> tuple[str, ...]:
    """'fid,kid' -> ('fid', 'kid'), checked against the metric names."""
    try:
        return ev.check_metrics(t.strip() for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _option(text: str) -> tuple[str, float]:
    """'s_churn=40' -> ('s_churn', 40.0)."""
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad sampler option {text!r}: expected name=number"
        ) from None


def _common(p: argparse.ArgumentParser, metrics: str) -> None:
    """Flags every subcommand takes."""
    p.add_argument("--metrics", type=_metrics, default=_metrics(metrics),
                   help=f"comma-separated, of {sorted(ev.METRICS)} [default: {metrics}]")  # fmt: skip
    p.add_argument("--inception-weights", default=None, help="Inception-v3 weights (.npz/.pth)")
    p.add_argument("--dinov2-weights", default=None, help="DINOv2-L/14 weights (.npz/.pth)")
    p.add_argument("--clip-weights", default=None, help="OpenAI CLIP weights for fd_clip (.pt)")
    p.add_argument("--detector-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=64, help="images per batch (all local devices)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _scored(p: argparse.ArgumentParser) -> None:
    """Flags of the subcommands that compare with a reference."""
    p.add_argument("--ref", default=None, help="reference statistics (.npz edm / .pkl edm2)")
    p.add_argument("--results", default="metrics.jsonl", help="JSON lines file to append to")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m edm_jax.metrics", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="statistics of a dataset into a reference file")
    ref.add_argument("--data", required=True, help="data source: tfds, folder, zip, npz, digits")
    ref.add_argument("--path", default="", help="folder, zip or npz path")
    ref.add_argument("--tfds-name", default="", help="tfds dataset name (--data tfds)")
    ref.add_argument("--split", default="train")
    ref.add_argument("--resolution", type=int, required=True, help="image resolution")
    ref.add_argument("--channels", type=int, default=3)
    ref.add_argument("--dest", required=True, help="reference file to write (.npz or .pkl)")
    _common(ref, "fid")
    gen = sub.add_parser("gen", help="generate images from a model and score them on the fly")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (latest checkpoint, EMA params)")
    src.add_argument("--checkpoint", help="one checkpoint directory of a training run")
    src.add_argument("--reference-npz", help="NVlabs/edm state_dict exported to .npz")
    seeds = gen.add_mutually_exclusive_group()
    seeds.add_argument("--num", type=int, default=None, help="seeds 0..num-1 [default: 50000]")
    seeds.add_argument("--seeds", type=_seeds, default=None, help="e.g. 0-49999")
    seeds.add_argument("--protocol", choices=["nvidia"], default=None,
                       help="nvidia: 50,000 images x seed ranges 0-, 50000-, 100000-; the minimum")  # fmt: skip
    gen.add_argument("--sampler", default="heun")
    gen.add_argument("--steps", type=int, default=18, help="sampling steps (heun 18 = 35 NFE)")
    gen.add_argument("--sigma-min", type=float, default=0.002)
    gen.add_argument("--sigma-max", type=float, default=80.0)
    gen.add_argument("--rho", type=float, default=7.0)
    gen.add_argument("--class", dest="class_idx", type=int, default=None, help="[default: random]")
    gen.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance")
    gen.add_argument("--option", type=_option, action="append", default=[],
                     help="sampler option name=value, e.g. s_churn=40 (repeatable)")  # fmt: skip
    _common(gen, "fid")
    _scored(gen)
    calc = sub.add_parser("calc", help="score a folder or .npz of images")
    calc.add_argument("--images", required=True, help="image folder or .npz (uint8 NHWC 'images')")
    _common(calc, "fid")
    _scored(calc)
    return p.parse_args(argv)


def _prepare(args) -> tuple[dict, dict]:
    """(detectors, reference) after checking weights, the reference and its sizes."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    weights = {"inception": args.inception_weights, "dinov2": args.dinov2_weights,
               "clip": args.clip_weights}  # fmt: skip
    ev.check_weights(args.metrics, weights)  # missing files: one line before anything loads
    ref: dict = {}
    if args.command != "ref" and set(args.metrics) - {"is"}:
        if not args.ref:
            raise ValueError(f"--ref is required for {[m for m in args.metrics if m != 'is']}")
        ref = refs.load_ref(args.ref)
        for metric in set(args.metrics) - {"is"}:
            if metric not in ref:
                raise ValueError(f"{args.ref} has no {metric!r} statistics; it has {sorted(ref)}")
    detectors = ev.load_detectors(args.metrics, weights, args.detector_dtype)
    dims = {n: int(d.feature_dim) for n, d in detectors.items()}
    if ref:
        ev.check_reference(ref, args.metrics, dims, args.ref)
    return detectors, ref


def _emit(args, results: dict, record: dict) -> list[dict]:
    """Print and append one JSON line per metric to --results."""
    rows = []
    for metric, value in results.items():
        if metric.endswith("_std"):
            continue
        row = {"metric": metric, "value": value, **record}
        if f"{metric}_std" in results:
            row["std"] = results[f"{metric}_std"]
        rows.append(row)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def cmd_ref(args) -> dict:
    """Statistics of a dataset written to --dest."""
    from edm_jax.data.load import load_source

    if "is" in args.metrics:
        raise ValueError("--metrics is: the Inception Score needs no reference; drop it")
    if Path(args.dest).suffix not in refs.SUFFIXES:
        raise ValueError(f"--dest {args.dest} must end in one of {list(refs.SUFFIXES)}")
    data = {"name": args.data, "path": args.path, "tfds_name": args.tfds_name,
            "split": args.split, "resolution": args.resolution, "channels": args.channels}  # fmt: skip
    source = load_source(data)
    detectors, _ = _prepare(args)
    scorer = ev.Scorer(args.metrics, detectors, len(source), args.batch)
    ref = ev.score_source(source, scorer, progress=not args.no_progress).reference()
    refs.save_ref(args.dest, ref)
    print(f"wrote {sorted(ref)} statistics of {len(source)} images to {args.dest}")
    return ref


class _ImageFolder:
    """The images under a folder (sorted names), read a slice at a time; one shape for all."""

    def __init__(self, root: Path):
        from edm_jax.data.images import IMAGE_EXTENSIONS

        self.files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.shape = self._read(self.files[0]).shape

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        from PIL import Image

        from edm_jax.data.images import DECODE_ERRORS

        try:
            with Image.open(path) as img:
                return np.asarray(img)
        except DECODE_ERRORS as e:
            raise ValueError(f"cannot read image {path}: {e}") from e

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: slice) -> np.ndarray:
        """uint8 images [k, H, W(, C)] of files[index]."""
        images = [self._read(f) for f in self.files[index]]
        for f, a in zip(self.files[index], images, strict=True):
            if a.shape != self.shape or a.dtype != np.uint8:
                raise ValueError(
                    f"{f} is {a.dtype} {a.shape}; valid: uint8 {self.shape} like {self.files[0]}"
                )
        return ev.check_images(np.stack(images), str(self.files[0].parent))


def _calc_images(path: str):
    """uint8 [N, H, W, C] images of a .npz ('images'), or a lazily read image folder."""
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p) as f:
            if "images" not in f:
                raise ValueError(f"{p} has no 'images' array (keys: {sorted(f.files)})")
            return ev.check_images(f["images"], str(p))
    if not p.is_dir():
        raise FileNotFoundError(f"--images {path}: not an image folder or .npz")
    folder = _ImageFolder(p)
    folder[:1]  # checks the first image's dtype and shape before anything is loaded
    return folder


def cmd_calc(args) -> list[dict]:
    """Score a folder or .npz of images against --ref."""
    images = _calc_images(args.images)
    if len(images) < 2:
        raise ValueError(f"--images {args.images}: need at least 2 images, got {len(images)}")
    detectors, ref = _prepare(args)
    t0 = time.time()
    scorer = ev.Scorer(args.metrics, detectors, len(images), args.batch)
    results = ev.score_arrays(images, scorer, progress=not args.no_progress).results(ref)
    record = {"num_images": len(images), "images": args.images, "ref": args.ref,
              "wall_time_s": time.time() - t0}  # fmt: skip
    return _emit(args, results, record)


def _seed_sets(args) -> list[list[int]]:
    """The seed lists to score (several for the NVIDIA protocol)."""
    if args.protocol == "nvidia":
        return [list(r) for r in ev.nvidia_seed_ranges()]
    if args.seeds is not None:
        return [args.seeds]
    num = 50000 if args.num is None else args.num
    if num < 2:
        raise ValueError(f"--num must be >= 2 (a covariance needs 2 images), got {num}")
    return [list(range(num))]


def cmd_gen(args) -> list[dict]:
    """Generate with edm_jax.sample and score on the fly (no PNGs written)."""
    import jax

    from edm_jax import api

    seed_sets = _seed_sets(args)
    if len(seed_sets[0]) < 2:
        raise ValueError(f"--seeds: need at least 2 images, got {len(seed_sets[0])}")
    options = dict(args.option)
    api.check_sample_args(args.sampler, args.steps, args.batch, **options)
    detectors, ref = _prepare(args)
    model, params, _ = api.load(args.workdir or args.checkpoint or args.reference_npz)
    rng, t0, runs = jax.random.key(0), time.time(), []  # key 0: the images of sample.py
    api.class_labels(rng, model, seed_sets[0][:1], args.class_idx)  # validates --class
    for seeds in seed_sets:
        scorer = ev.Scorer(args.metrics, detectors, len(seeds), args.batch)
        ev.generate_and_score(
            rng, params, model, scorer, seeds=seeds, labels=args.class_idx,
            progress=not args.no_progress, sampler=args.sampler, num_steps=args.steps,
            sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
            cfg_scale=args.cfg_scale, **options,
        )  # fmt: skip
        runs.append(scorer.results(ref))
    results = {k: min(r[k] for r in runs) for k in runs[0]}  # NVIDIA: best of the seed ranges
    if "is" in results:  # higher is better
        best = max(range(len(runs)), key=lambda i: runs[i]["is"])
        results["is"], results["is_std"] = runs[best]["is"], runs[best]["is_std"]
    record = {
        "num_images": len(seed_sets[0]), "seeds": ";".join(ev.seeds_text(s) for s in seed_sets),
        "sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
        "options": options, "model": args.workdir or args.checkpoint or args.reference_npz,
        "ref": args.ref, "protocol": args.protocol, "wall_time_s": time.time() - t0,
    }  # fmt: skip
    if len(runs) > 1:
        record["values"] = {k: [r[k] for r in runs] for k in runs[0]}
    return _emit(args, results, record)


COMMANDS = {"ref": cmd_ref, "gen": cmd_gen, "calc": cmd_calc}


def main(argv=None):
    """Entry point: run one subcommand and return what it produced."""
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one line, exit 2 (as every CLI here)
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
