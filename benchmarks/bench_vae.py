"""SD VAE encode/decode images/s and the dataset tool's images/s (prints JSON).

    python benchmarks/bench_vae.py --resolutions 256 512 --batch 1 --reps 3

VAE: the full sd-vae-ft-mse architecture (83.7M parameters) with random weights (speed
does not depend on the values), encode = pixels -> raw latents (mean, std), decode =
final latents -> uint8 pixels, as `LatentCodec`; compile time excluded (one warm-up).
Tool: `python -m edm_jax.data.tool` on a folder of synthetic 384x288 JPEGs, to an image zip
(center-crop-dhariwal) and to latents with a tiny random VAE (the tool's own overhead; with
the full VAE its rate is the encode rate above). The device is reported with the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL.Image

from edm_jax.data.latents import LatentCodec
from edm_jax.data.tool import ToolArgs, run_tool
from edm_jax.nets.vae import VAEConfig, build_vae, random_vae_params, to_state_dict


def _rate(fn, x, reps: int) -> float:
    """Calls per second of fn(x) after one warm-up (compile) call."""
    jax.block_until_ready(fn(x))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(x))
    return reps / (time.perf_counter() - t)


def bench_vae(resolutions, batch: int, reps: int) -> dict:
    """Encode and decode images/s of the full sd-vae-ft-mse at each resolution."""
    vae = build_vae("sd-vae-ft-mse")
    codec = LatentCodec.edm2(vae, random_vae_params(0, vae))
    rng = np.random.default_rng(0)
    out = {}
    for r in resolutions:
        pixels = rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8)
        z = rng.standard_normal((batch, r // 8, r // 8, 4)).astype(np.float32) * 0.5
        out[f"encode_{r}_images_per_s"] = round(batch * _rate(codec.encode_pixels, pixels, reps), 4)
        out[f"decode_{r}_images_per_s"] = round(batch * _rate(codec.decode, z, reps), 4)
    return out


def bench_tool(n: int, res: int) -> dict:
    """The tool's images/s: folder of JPEGs -> zip, and -> latents with a tiny VAE."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            low = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
            img = PIL.Image.fromarray(low).resize((384, 288), PIL.Image.Resampling.BILINEAR)
            img.save(root / "src" / f"{i:05d}.jpg")
        tiny = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
        np.savez(root / "w.npz", **to_state_dict(random_vae_params(0, build_vae(tiny))))
        (root / "c.json").write_text(json.dumps({"block_out_channels": [8, 8, 16, 16],
                                                 "layers_per_block": 1, "norm_num_groups": 4}))  # fmt: skip
        common = dict(transform="center-crop-dhariwal", resolution=res, quiet=True)
        z = run_tool(ToolArgs(str(root / "src"), str(root / "o.zip"), **common))
        lat = run_tool(
            ToolArgs(
                str(root / "src"),
                str(root / "lat"),
                encoder=str(root / "c.json"),
                encoder_weights=str(root / "w.npz"),
                **common,
            )  # fmt: skip
        )
    return {
        f"tool_zip_{res}_images_per_s": z["images_per_s"],
        f"tool_latents_tiny_vae_{res}_images_per_s": lat["images_per_s"],
        "tool_images": n,
    }


def main() -> None:
    """Parse flags, run, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tool-images", type=int, default=64)
    p.add_argument("--tool-resolution", type=int, default=256)
    p.add_argument("--skip-vae", action="store_true")
    a = p.parse_args()
    dev = jax.devices()[0]
    result = {"device": f"{dev.platform}: {dev.device_kind}", "num_devices": jax.device_count()}
    result["batch"] = a.batch
    if not a.skip_vae:
        result.update(bench_vae(a.resolutions, a.batch, a.reps))
    result.update(bench_tool(a.tool_images, a.tool_resolution))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
