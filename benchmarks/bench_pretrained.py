"""Sampling images/s of a guided-diffusion model loaded from a checkpoint, with and without
classifier guidance (edm_jax.pretrained.load_pretrained -> edm_jax.sample).

Prints JSON. Usage: python benchmarks/bench_pretrained.py [--size 32] [--channels 64]
[--batch 8] [--steps 10] [--repeats 3]
The model and classifier are random-weight guided-diffusion configurations (256x256_diffusion's
layout at a reduced size: learned sigma, scale-shift norm, resblock up/down, 64-channel heads)
written as safetensors and loaded through the same path as released files. On the CPU this
measures the reduced size only (say so with the "device" field); released sizes need a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import edm_jax
from edm_jax import pretrained as pt
from edm_jax.nets import convert_openai as co
from edm_jax.nets.reader import write_safetensors


def families(size: int, channels: int) -> tuple[pt.Family, pt.Family]:
    """(model, classifier) families: 256x256_diffusion's options at image size ``size``."""
    mult = (1, 2, 2)
    model = pt.Family("bench-gd", "guided-diffusion", arch=dict(
        image_size=size, in_channels=3, model_channels=channels, out_channels=6,
        num_res_blocks=2, attention_resolutions=(2, 4), channel_mult=mult, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True,
    ))  # fmt: skip
    classifier = pt.Family("bench-classifier", "classifier", arch=dict(
        img_resolution=size, in_channels=3, out_channels=1000, model_channels=channels,
        channel_mult=mult, num_blocks=2, attn_resolutions=(size // 2, size // 4), dropout=0.0,
        adaptive_scale=True, resblock_updown=True, min_channels_per_group=1,
        qkv_layout="legacy", channels_per_head=64,
    ))  # fmt: skip
    return model, classifier


def write_random(path: Path, family: pt.Family, seed: int) -> Path:
    """A random-weight checkpoint of family (reference names and layouts) as safetensors."""
    rng = np.random.default_rng(seed)
    shapes = co.reference_shapes(pt.build_network(family))
    sd = {
        k: (
            rng.normal(size=s) / np.sqrt(np.prod(s[1:])) if len(s) > 1 else 0.1 * rng.normal(size=s)
        ).astype(np.float32)
        for k, s in shapes.items()
    }
    return write_safetensors(path, sd)


def measure(model, params, args) -> dict:
    """Compile + first call seconds and best images/s over repeats (api.sample, one batch)."""
    kw = dict(
        seeds=list(range(args.batch)), sampler=args.sampler, num_steps=args.steps,
        batch_size=args.batch, labels=0 if model.label_dim else None,
    )  # fmt: skip
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    edm_jax.sample(rng, params, model, **kw)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        edm_jax.sample(rng, params, model, **kw)
        best = min(best, time.perf_counter() - t0)
    return {"compile_and_first_s": round(first, 3), "best_s": round(best, 4),
            "images_per_s": round(args.batch / best, 3),
            "denoiser_evals_per_s": round(args.batch * args.steps / best, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--classifier-scale", type=float, default=1.0)
    args = p.parse_args()
    fam, cfam = families(args.size, args.channels)
    with tempfile.TemporaryDirectory() as d:
        src = write_random(Path(d) / "model.safetensors", fam, 0)
        csrc = write_random(Path(d) / "classifier.safetensors", cfam, 1)
        t0 = time.perf_counter()
        model, params, _ = pt.load_pretrained(src, fam)
        load_s = time.perf_counter() - t0
        guided = pt.load_pretrained(
            src, fam, classifier=csrc, classifier_family=cfam,
            classifier_scale=args.classifier_scale,
        )  # fmt: skip
    device = jax.devices()[0]
    report = {
        "benchmark": "bench_pretrained",
        "device": f"{device.platform} ({device.device_kind})",
        "note": "CPU at a reduced size (random-weight 256x256_diffusion layout at --size)"
        if device.platform == "cpu" else "accelerator, reduced size",
        "config": {k: v for k, v in vars(args).items()},
        "load_checkpoint_s": round(load_s, 3),
        "unguided": measure(model, params, args),
        "classifier_guided": measure(guided[0], guided[1], args),
    }  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
