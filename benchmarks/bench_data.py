"""Images/s delivered by the data pipeline, with and without EDM augmentation (prints JSON).

    python benchmarks/bench_data.py --resolutions 32 64 --batch 512 --steps 50 --workers 16

Sources: `zip` (an NVlabs/edm-style zip of PNGs written to a temp dir: PNG decoding
included, like tfds/zip/folder data) or `arrays` (in-memory uint8: pipeline overhead
only). Three numbers per resolution: the host pipeline alone; augmentation alone
(jit, on the default device); and the two together as a training loop uses them
(batch -> device -> augment, dispatched asynchronously).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zipfile

import jax
import numpy as np
import PIL.Image

from edm_jax.data import ArraySource, ZipSource, augment, make_pipeline


def _images(n: int, res: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random uint8 images [n,res,res,3] (noise upsampled 4x: PNG-compressible)."""
    low = np.random.default_rng(seed).integers(0, 256, (n, res // 4, res // 4, 3), np.uint8)
    return low.repeat(4, axis=1).repeat(4, axis=2)


def _source(kind: str, n: int, res: int, tmp: str):
    """The benchmark source of n images at res x res."""
    images = _images(n, res)
    if kind == "arrays":
        return ArraySource(images, resolution=res, channels=3, use_labels=False)
    path = os.path.join(tmp, f"bench{res}.zip")
    with zipfile.ZipFile(path, "w") as z:
        for i, im in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(im).save(buf, format="PNG")
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
    return ZipSource(path, resolution=res, channels=3, use_labels=False)


def _rate(fn, steps: int, batch: int, warmup: int = 1) -> float:
    """images/s of `steps` calls of fn after `warmup` calls (compile; drain prefetch buffers)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return steps * batch / (time.perf_counter() - start)


def bench(res: int, args, tmp: str) -> dict:
    """Pipeline, augmentation and combined throughput at one resolution."""
    src = _source(args.source, args.num_images, res, tmp)
    pipe = make_pipeline(
        src,
        global_batch_size=args.batch,
        seed=0,
        shard_index=0,
        shard_count=1,
        num_workers=args.workers,
    )
    aug = jax.jit(lambda rng, x: augment(rng, x, p=args.p))
    x = jax.device_put(next(pipe)["image"])
    keys = iter(jax.random.split(jax.random.key(0), 4 * args.steps + 8))
    result = {
        "resolution": res,
        "pipeline_images_per_s": _rate(
            lambda: next(pipe)["image"], args.steps, args.batch, warmup=8 + 2 * args.workers
        ),
        "augment_images_per_s": _rate(lambda: aug(next(keys), x), args.steps, args.batch),
        "pipeline_plus_augment_images_per_s": _rate(
            lambda: aug(next(keys), jax.device_put(next(pipe)["image"])), args.steps, args.batch
        ),
    }
    pipe.close()
    return result


def main() -> None:
    """Parse flags, run, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--source", choices=["zip", "arrays"], default="zip")
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--p", type=float, default=0.12, help="augmentation probability")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(r, args, tmp) for r in args.resolutions]
    info = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "source": args.source,
        "batch": args.batch,
        "steps": args.steps,
        "workers": args.workers,
        "p": args.p,
    }
    print(json.dumps({**info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
