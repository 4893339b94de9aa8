"""Generate images from a trained model: one PNG per seed, a grid PNG and an .npz.

python sample.py --workdir runs/cifar --seeds 0-63 --sampler heun --steps 18 --outdir out
python sample.py --reference-npz edm-cifar10-32x32-cond-vp.npz --class 3 --outdir out
python sample.py --list-samplers

A user error (bad flag value, missing path) prints one line ``error: ...`` and exits 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from edm_jax.clip import cli as clip_cli
from edm_jax.sd import cli as sd_cli


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,9-10' -> [0, 1, 2, 3, 7, 9, 10] (as NVlabs/edm generate.py)."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise argparse.ArgumentTypeError(
                f"bad seed list {text!r}: expected e.g. '0-63' or '1,5,7-9'"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: end before start")
        if hi > 2**32 - 1:
            raise argparse.ArgumentTypeError(f"seed {hi} is out of range: seeds are 0 to 2**32 - 1")
        seeds.extend(range(lo, hi + 1))
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="training workdir (latest checkpoint, EMA params)")
    src.add_argument("--checkpoint", help="one checkpoint directory of a training run")
    src.add_argument("--reference-npz", help="NVlabs/edm state_dict exported to .npz (converted)")
    p.add_argument("--sampler", default=None, help="sampler name (see --list-samplers) [heun]")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps [18]")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 0-63 or 1,5,7-9 [0-63]")
    p.add_argument("--batch", type=int, default=None, help="images per batch [64]")
    p.add_argument("--class", dest="class_idx", default=None,
                   help="class index or name (folder datasets) [default: random]")  # fmt: skip
    p.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="sampler option, e.g. --option s_churn=40 (see --list-samplers)")  # fmt: skip
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance [1]")
    p.add_argument(
        "--outdir", default="samples", help="where to write PNGs, grid.png and samples.npz"
    )
    p.add_argument("--guide", help="guide model (workdir, checkpoint or .npz): autoguidance, "
                   "or EDM2 classifier-free guidance if it is unconditional")  # fmt: skip
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale with --guide")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for sigma in [LO, HI] (Kynkaanniemi et al. 2024)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--list-samplers", action="store_true",
                   help="print the samplers with their options and defaults, and exit")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    from edm_jax.pretrained import add_arguments  # --family, --classifier, --classifier-scale

    add_arguments(p)
    clip_cli.add_arguments(p)
    sd_cli.add_arguments(p)  # Stable Diffusion: --checkpoint FILE.safetensors --prompt ...
    args = p.parse_args(argv)
    sd_cli.fill_defaults(args)
    if not args.list_samplers and not (args.workdir or args.checkpoint or args.reference_npz):
        p.error("one of --workdir, --checkpoint or --reference-npz is required")
    return args


def _atomic_write(path: Path, write) -> None:
    """write(file_object) into a temp file beside path, then rename over it."""
    from edm_jax.fileio import atomic_open

    with atomic_open(path, "wb") as f:
        write(f)


def write_outputs(outdir: Path, images: np.ndarray, seeds, labels) -> None:
    """One PNG per seed, grid.png and samples.npz (uint8 images, seeds, labels)."""
    from PIL import Image

    from edm_jax.api import image_grid, to_uint8

    outdir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)  # [N,H,W,C]
    for seed, img in zip(seeds, pixels, strict=True):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        _atomic_write(outdir / f"{seed:06d}.png", lambda f, pil=pil: pil.save(f, format="PNG"))
    grid = image_grid(pixels, min_tile=32)  # small images upscaled, as the training grids
    grid_pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    _atomic_write(outdir / "grid.png", lambda f: grid_pil.save(f, format="PNG"))
    extra = {} if labels is None else {"labels": np.asarray(labels)}
    _atomic_write(
        outdir / "samples.npz",
        lambda f: np.savez(f, images=pixels, seeds=np.asarray(seeds), **extra),
    )


def parse_options(items: list[str]) -> dict:
    """['s_churn=40', 'eta=0'] -> {'s_churn': 40, 'eta': 0} (numbers, true/false, else text)."""
    import ast

    options = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--option {item!r} must be K=V, e.g. --option s_churn=40")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            options[key.strip()] = lowered == "true"
            continue
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    return options


def list_samplers() -> str:
    """One line per sampler: name, what it takes, options with defaults (SAMPLER_INFO)."""
    from edm_jax.samplers import SAMPLER_INFO

    lines = []
    for name, info in sorted(SAMPLER_INFO.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "no options"
        kind = "stochastic" if info.stochastic else "deterministic"
        lines.append(f"{name:<20} {kind:<13} {opts}")
    lines.append(
        "edm_sampler, ablation_sampler: NVlabs/edm's functions with its own signature, "
        "called from Python (edm_jax.samplers); here use heun (edm_sampler) or heun_sde "
        "(edm_sampler with S_churn, via --option s_churn=...)"
    )
    return "\n".join(lines)


def check_numbers(args: argparse.Namespace) -> None:
    """Finite sigma range, rho and guidance scale, steps and batch, before anything is loaded."""
    from edm_jax.samplers.checks import check_range, check_scalar, check_seeds

    check_range(args.sigma_min, args.sigma_max)
    check_scalar("--rho", args.rho, positive=True, allow_zero=False)
    check_scalar("--cfg-scale", args.cfg_scale)
    check_seeds(args.seeds)
    for flag, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value}")


def resolve_class(model, value: str | None):
    """--class as a class index, or a class name of a folder dataset the run saved."""
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    names = list(getattr(model, "class_names", ()) or ())
    if value in names:
        return names.index(value)
    from edm_jax.checks import did_you_mean

    if not names:
        raise ValueError(f"--class {value!r}: this model has no class names; give an index")
    raise ValueError(
        f"--class {value!r} is not a class{did_you_mean(value, names)}; valid: {names}"
    )


def warn_cfg_without_dropout(model, args: argparse.Namespace) -> None:
    """A warning when --cfg-scale guides with an unconditional branch that was never trained."""
    dropout = getattr(getattr(model, "net", None), "label_dropout", None)
    if args.cfg_scale != 1.0 and not args.guide and dropout == 0:
        print(
            f"warning: --cfg-scale {args.cfg_scale} on a model trained without label dropout "
            "(model.net.label_dropout=0): its unconditional output was never trained",
            file=sys.stderr,
        )


# Errors a user can fix: one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv=None) -> int:
    """Entry point: one line `error: ...` and exit status 2 on a user error (unless --debug)."""
    args = parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    """Load, sample, write."""
    from edm_jax import api

    if args.list_samplers:
        print(list_samplers())
        return 0
    check_numbers(args)
    clip_cli.check(args)
    options = parse_options(args.option)
    sd_cli.check_flags(args)
    if sd_cli.wants_sd(args):
        return sd_cli.main(args, options, write_outputs)
    api.check_sample_args(args.sampler, args.steps, args.batch, **options)
    from edm_jax.pretrained import load_for_cli

    model, params, _ = load_for_cli(args, api.load)  # ours, or a foreign --checkpoint file
    class_idx = resolve_class(model, args.class_idx)
    warn_cfg_without_dropout(model, args)
    if args.guide:  # autoguidance / EDM2 CFG: checked against the main model before compute
        from edm_jax.guidance import GuidedModel

        guide, guide_params, _ = api.load(args.guide)
        model = GuidedModel(model, guide, args.guidance, args.guidance_interval)
        params = (params, guide_params)
    model, params = clip_cli.wrap(args, model, params)
    import jax

    rng = jax.random.key(0)
    labels = api.class_labels(rng, model, args.seeds, class_idx)  # validates --class
    images = api.sample(
        rng, params, model, seeds=args.seeds, sampler=args.sampler,
        num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
        labels=labels, cfg_scale=args.cfg_scale, batch_size=args.batch,
        progress=not args.no_progress, **options,
    )  # fmt: skip
    write_outputs(Path(args.outdir), images, args.seeds, labels)
    print(f"wrote {len(args.seeds)} images, grid.png and samples.npz to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
