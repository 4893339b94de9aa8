"""Metrics throughput: detector features/s and generate-and-score (FID) wall time. Prints JSON.

python benchmarks/bench_metrics.py                       # full-size nets, random weights
python benchmarks/bench_metrics.py --inception-weights inception.npz --dinov2-weights dino.npz
python benchmarks/bench_metrics.py --tiny                # small nets: a smoke check on a CPU

Figures: Inception-v3 features/s for 32x32 and 64x64 uint8 input (resized to 299 inside),
DINOv2-L/14 features/s (224x224), and the wall time of ``generate_and_score`` for N
CIFAR-size images from a DDPM++ net (EDM's CIFAR-10 config, random weights: speed does not
depend on the values) with Heun's 18 steps (35 NFE). Each timing follows a warm-up call,
so compilation is reported apart. Weight values do not change the speed; random full-size
weights are made from the parameter shapes (jax.eval_shape) without compiling an init.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.metrics import detectors, evaluate
from edm_jax.metrics.dinov2 import DINOV2_PRESETS


def _random_like(tree, seed: int = 0):
    """Random float32 arrays shaped like tree's ShapeDtypeStructs: normal(0, 0.02) kernels,
    ones for norm scales and running variances, zeros for the rest (finite features)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("kernel", "embedding") or "embed" in name or "token" in name:
            return (rng.standard_normal(s.shape) * 0.02).astype(np.float32)
        return np.full(s.shape, 1.0 if name in ("scale", "var", "gamma") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, tree)


TINY: dict[str, dict[str, Any]] = {"inception": {"width": 1 / 16, "size": 75},
        "dinov2": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 224, "size": 56}}  # fmt: skip


def _detector(name: str, weights: str | None, tiny: bool) -> detectors.Detector:
    """Real weights if given; else random weights (full size, or small with --tiny)."""
    if weights:
        return detectors.load_detector(name, weights)
    config: dict[str, Any] = (
        {} if name == "inception" else dataclasses.asdict(DINOV2_PRESETS["dinov2_vitl14"])
    )
    module, size = detectors._module(name, "float32", **(TINY[name] if tiny else config))  # noqa: SLF001
    params = _random_like(detectors.param_template(module, size))
    return detectors._make(name, module, params, size)  # noqa: SLF001


def features_per_s(det: detectors.Detector, res: int, batch: int, repeats: int) -> dict:
    """Features/s of det on uint8 [batch, res, res, 3] images (after one warm-up call)."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, [batch, res, res, 3], np.uint8))
    t0 = time.time()
    det.features(x).block_until_ready()
    compile_s = time.time() - t0
    t0 = time.time()
    for _ in range(repeats):
        det.features(x).block_until_ready()
    dt = time.time() - t0
    return {"input": f"{res}x{res}", "batch": batch, "repeats": repeats,
            "features_per_s": batch * repeats / dt, "first_call_s": compile_s}  # fmt: skip


def _ddpmpp(tiny: bool):
    """(model, random params) of EDM's CIFAR-10 DDPM++ (conditional), or a small one."""
    from edm_jax.nets.presets import build_model

    extra: dict[str, Any] = (
        dict(model_channels=16, channel_mult=(1, 2), num_blocks=1) if tiny else {}
    )
    model = build_model("ddpmpp_cifar10", img_resolution=32, img_channels=3, label_dim=10, **extra)
    return model, _random_like(jax.eval_shape(model.init, jax.random.key(0)))


def gen_fid(inception: detectors.Detector, n: int, batch: int, steps: int, tiny: bool) -> dict:
    """Wall time of generate_and_score for n images (after a one-batch warm-up)."""
    model, params = _ddpmpp(tiny)
    dim = inception.feature_dim
    ref = {"fid": {"mu": np.zeros(dim), "sigma": np.eye(dim)}}
    kw: dict[str, Any] = dict(sampler="heun", num_steps=steps)
    t0 = time.time()
    warm = evaluate.Scorer(["fid"], {"inception": inception}, max(batch, 2), batch)
    evaluate.generate_and_score(
        jax.random.key(0), params, model, warm, seeds=range(max(batch, 2)), **kw
    )
    first = time.time() - t0
    t0 = time.time()
    scorer = evaluate.Scorer(["fid"], {"inception": inception}, n, batch)
    evaluate.generate_and_score(jax.random.key(0), params, model, scorer, seeds=range(n), **kw)
    fid = scorer.results(ref)["fid"]
    return {"num_images": n, "batch": batch, "sampler": "heun", "steps": steps,
            "nfe": 2 * steps - 1, "wall_s": time.time() - t0, "first_batch_s": first,
            "images_per_s": n / (time.time() - t0), "fid_vs_dummy_ref": fid}  # fmt: skip


def main(argv=None) -> dict:
    """Run the benchmarks and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--dinov2-weights", default=None)
    p.add_argument("--tiny", action="store_true", help="small random nets (CPU smoke check)")
    p.add_argument("--batch", type=int, default=None, help="[default: 256 GPU/TPU, 8 CPU]")
    p.add_argument("--dinov2-batch", type=int, default=None, help="[default: 64 GPU/TPU, 2 CPU]")
    p.add_argument("--num", type=int, default=None, help="gen images [default: 10000, CPU 16]")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (18 = 35 NFE)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    batch = args.batch or (8 if cpu else 256)
    out: dict = {"backend": jax.default_backend(), "devices": jax.device_count(),
                 "device_kind": jax.devices()[0].device_kind, "tiny": args.tiny,
                 "random_weights": not (args.inception_weights and args.dinov2_weights)}  # fmt: skip
    if cpu:
        out["note"] = "CPU figures with small batches and N; not GPU numbers"
    inc = _detector("inception", args.inception_weights, args.tiny)
    for res in (32, 64):
        out[f"inception_{res}"] = features_per_s(inc, res, batch, args.repeats)
    dino = _detector("dinov2", args.dinov2_weights, args.tiny)
    dbatch = args.dinov2_batch or (2 if cpu else 64)
    out["dinov2" if args.tiny else "dinov2_l14"] = features_per_s(dino, 224, dbatch, args.repeats)
    out["gen_fid"] = gen_fid(inc, args.num or (16 if cpu else 10000), batch, args.steps, args.tiny)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
