"""sample.py's Stable Diffusion job: ``--checkpoint FILE.safetensors|.ckpt|FOLDER --prompt ...``.

``add_arguments(parser)`` defines the flags, ``fill_defaults(args)`` sets the defaults that
differ between SD files and trained models (sampler, steps, cfg scale, seeds, batch), and
``main(args)`` loads, checks, samples and writes the images (sample.py's output layout).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from edm_jax.sd.load import is_sd_checkpoint

__all__ = ["add_arguments", "fill_defaults", "main", "read_init_image", "wants_sd"]

# flag -> (default for SD checkpoints, default for trained models)
_DEFAULTS = {
    "sampler": ("dpmpp_2m", "heun"),
    "steps": (25, 18),
    "cfg_scale": (7.5, 1.0),
    "seeds": ([0], list(range(64))),
    "batch": (8, 64),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The Stable Diffusion flags (used when --checkpoint is a .ckpt / .safetensors file or a
    diffusers folder)."""
    g = p.add_argument_group(
        "Stable Diffusion (--checkpoint FILE.safetensors, FILE.ckpt or a diffusers folder)"
    )
    g.add_argument("--prompt", action="append", default=None,
                   help="text prompt (repeat for one prompt per seed)")  # fmt: skip
    g.add_argument("--negative-prompt", default="", help="negative prompt [default: empty]")
    g.add_argument("--schedule", default="karras", help="sigma schedule [default: karras]")
    g.add_argument("--height", type=int, default=None, help="[default: 512; 768 for v models]")
    g.add_argument("--width", type=int, default=None, help="[default: 512; 768 for v models]")
    g.add_argument("--prediction", default=None, choices=("eps", "v"),
                   help="output parameterisation [default: from the config / file name]")  # fmt: skip
    g.add_argument("--sd-config", default=None,
                   help="released U-Net config: sd15, sd21_v, sd2_base [default: from shapes]")  # fmt: skip
    g.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema U-Net")
    g.add_argument("--bf16", action="store_true", help="run the U-Net in bfloat16")
    g.add_argument(
        "--vocab", default=None, help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)"
    )
    g.add_argument("--init-image", default=None,
                   help="img2img: start from this .png/.jpg (resized to --height x --width)")  # fmt: skip
    g.add_argument("--strength", type=float, default=0.75,
                   help="img2img: fraction of the steps run from the noised init image [0.75]")  # fmt: skip


def wants_sd(args: argparse.Namespace) -> bool:
    """Whether the run is a Stable Diffusion job (--checkpoint names an SD file; a k-diffusion
    inference .safetensors, told by the config in its header, is not one)."""
    path = getattr(args, "checkpoint", None)
    if not path or not is_sd_checkpoint(path):
        return False
    if str(path).lower().endswith(".safetensors"):
        from edm_jax.nets.kdiff_files import is_kdiff_file

        return not is_kdiff_file(path)
    return True


def fill_defaults(args: argparse.Namespace) -> None:
    """Set the flags left at None to the SD or the trained-model default."""
    pick = 0 if wants_sd(args) else 1
    for name, values in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[pick])
    if hasattr(args, "sampling_defaults"):  # CLIP guidance compares (sampler, steps) with them
        args.sampling_defaults = (_DEFAULTS["sampler"][pick], _DEFAULTS["steps"][pick])


def check_flags(args: argparse.Namespace) -> None:
    """SD-only flags with another model, or a missing --prompt: one ValueError."""
    if not wants_sd(args):
        if args.prompt is not None:
            raise ValueError("--prompt needs --checkpoint FILE.safetensors or FILE.ckpt (SD)")
        if args.init_image is not None:
            raise ValueError("--init-image needs --checkpoint FILE.safetensors or FILE.ckpt (SD)")
        return
    if not args.prompt:
        raise ValueError("--prompt is required with a Stable Diffusion checkpoint")
    for dest, flag in (
        ("class_idx", "--class"),
        ("guide", "--guide"),
        ("clip_prompt", "--clip-prompt"),
    ):
        if getattr(args, dest, None):
            raise ValueError(f"{flag} does not apply to Stable Diffusion checkpoints")


def read_init_image(path: str, height: int, width: int):
    """uint8 [1, height, width, 3] of an image file, resized as diffusers' default preprocessing
    (VaeImageProcessor: a plain Lanczos resize to height x width, no crop)."""
    import numpy as np
    from PIL import Image

    if not Path(path).is_file():
        raise ValueError(f"--init-image {path}: no such file")
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(rgb, np.uint8)[None]


def main(args: argparse.Namespace, options: dict, write_outputs: Callable) -> int:
    """Load the SD file, sample every seed, write PNGs, grid.png and samples.npz."""
    import jax
    import jax.numpy as jnp

    from edm_jax import api
    from edm_jax.checks import check_choice
    from edm_jax.sd import generate, load

    api.check_sample_args(args.sampler, args.steps, args.batch, **options)
    check_choice("--schedule", args.schedule, generate.T2I_SCHEDULES)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"{flag} {value} is not a multiple of 8 (the VAE's downsampling)")
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    pipe, params = load.load_pipeline(args.checkpoint, config=args.sd_config,
                                      prediction=args.prediction, ema=args.ema, dtype=dtype,
                                      vocab=args.vocab)  # fmt: skip
    side = 768 if pipe.prediction == "v" else 512
    height, width = args.height or side, args.width or side
    pipe.check_size(height, width)  # a multiple of 64 for the SD U-Net (8 x 8)
    print(load.describe(pipe), file=sys.stderr)
    init = {} if args.init_image is None else dict(strength=args.strength,
            init_images=read_init_image(args.init_image, height, width))  # fmt: skip
    images = generate.text_to_image(
        jax.random.key(0), pipe, params, args.prompt, args.negative_prompt, **init,
        sampler=args.sampler, schedule=args.schedule, steps=args.steps, cfg_scale=args.cfg_scale,
        seeds=args.seeds, height=height, width=width, batch_size=args.batch, **options,
    )  # fmt: skip
    # sample.py's writer quantises with to_uint8 (x * 127.5 + 128): these floats give back images
    write_outputs(Path(args.outdir), images.astype("float32") / 127.5 - 1.0, args.seeds, None)
    print(f"wrote {len(args.seeds)} images, grid.png and samples.npz to {args.outdir}")
    return 0
