"""Stable Diffusion text-to-image throughput: images/s and seconds to the first image (JSON).

    python benchmarks/bench_t2i.py                       # reduced random pipeline (CPU)
    python benchmarks/bench_t2i.py --full --size 512 --bf16   # SD 1.5 architecture (GPU)

Random weights (no download): ``--full`` builds the SD 1.5 U-Net and the sd-vae-ft-mse VAE;
the default is a reduced U-Net/VAE sized for a CPU, and the JSON says which. The text encoder
is a stand-in embedding table (prompt encoding is outside the sampling loop and not timed).
Per batch size: seconds to the first images (compile included), then images/s and sampler
steps/s of ``text_to_image`` (dpmpp_2m, karras, CFG 7.5: each step runs the U-Net on 2B).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.nets import ldm_unet as lu
from edm_jax.nets import vae as vae_lib
from edm_jax.sd import generate, pipeline

REDUCED_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32,
                    attention_resolutions=(2, 1), num_res_blocks=1, channel_mult=(1, 2, 2),
                    num_heads=4, context_dim=128)  # fmt: skip
REDUCED_VAE = vae_lib.VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)


def _random(shapes, seed: int):
    """Kernels N(0, 1/fan_in), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "kernel":
            scale = 1 / np.sqrt(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape, np.float32) * scale)
        return jnp.ones(s.shape) if path[-1].key == "scale" else jnp.zeros(s.shape)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def build(full: bool, dtype) -> tuple[pipeline.StableDiffusion, dict]:
    """A random pipeline: the SD 1.5 architecture, or the reduced one."""
    net = lu.released_unet("sd15", dtype) if full else lu.ldm_unet(**REDUCED_UNET, dtype=dtype)
    vae = vae_lib.build_vae("sd-vae-ft-mse" if full else REDUCED_VAE)

    def tokenize(prompts):
        return np.array([[hash(p) % 1000 + i for i in range(77)] for p in prompts], np.int32)

    text = pipeline.TextEncoder(tokenize, lambda p, ids: p[ids], net.context_dim)
    pipe = pipeline.StableDiffusion(net, vae, text, "eps", "sd1")
    unet_shapes = jax.eval_shape(lambda: lu.init_ldm_unet(net, jax.random.key(0)))
    params = {
        "unet": _random(unet_shapes, 0),
        "vae": vae_lib.random_vae_params(1, vae),
        "text": jax.random.normal(jax.random.key(2), (1100, net.context_dim)) * 0.1,
    }
    return pipe, params


def run(pipe, params, batch: int, size: int, steps: int, repeats: int) -> dict:
    """First-call seconds (compile included) and steady images/s at one batch size."""
    kw = dict(steps=steps, height=size, width=size, batch_size=batch, cfg_scale=7.5)
    t0 = time.perf_counter()
    generate.text_to_image(jax.random.key(0), pipe, params, "a photo", seeds=range(batch), **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(repeats):
        seeds = range((r + 1) * batch, (r + 2) * batch)
        generate.text_to_image(jax.random.key(0), pipe, params, f"photo {r}", seeds=seeds, **kw)
    dt = (time.perf_counter() - t0) / repeats
    return dict(batch=batch, seconds_to_first_images=round(first, 3),
                images_per_s=round(batch / dt, 4), steps_per_s=round(steps / dt, 3))  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared with bench_t2i_vs_diffusers.py."""
    p.add_argument("--full", action="store_true", help="SD 1.5 architecture (GPU)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=2)


def main() -> None:
    """Parse flags, run each batch size, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--bf16", action="store_true", help="U-Net in bfloat16")
    args = p.parse_args()
    pipe, params = build(args.full, jnp.bfloat16 if args.bf16 else jnp.float32)
    results = [run(pipe, params, b, args.size, args.steps, args.repeats) for b in args.batches]
    print(json.dumps(dict(
        benchmark="text_to_image dpmpp_2m karras cfg 7.5",
        model="SD 1.5 architecture, random weights" if args.full else
              f"reduced random U-Net {REDUCED_UNET} + VAE {REDUCED_VAE.block_out_channels}",
        device=str(jax.devices()[0]), size=args.size, steps=args.steps,
        dtype="bfloat16" if args.bf16 else "float32", results=results,
        note="text encoder is a stand-in table (not timed); CPU numbers are for regressions only",
    ), indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
