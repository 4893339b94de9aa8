"""CLIP-guided sampling's cost per step beside unguided sampling of the same model, and CLIP
encodings per second. Random weights; prints one JSON object (device named in it).

The model is a small DDPM++ (``--resolution``, ``--channels``) under EDM preconditioning; the
guided run adds CLIP (``--clip``: a preset, or ``tiny``) and the gradient through denoiser and
CLIP. Encodings: ``encode_image`` at the preset's resolution and ``encode_text`` at 77 tokens.

    python benchmarks/bench_clip.py [--clip ViT-B/16] [--batch 4] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.clip import guidance as G
from edm_jax.clip import model as clip_model
from edm_jax.metrics.detectors import _random_params
from edm_jax.samplers import SAMPLERS
from edm_jax.schedules import karras

TINY = clip_model.CLIPConfig.openai(
    embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
    transformer_width=128, transformer_heads=2, transformer_layers=2,
)  # fmt: skip


def _timed(fn, *args, rounds: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds of the next rounds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _model(resolution: int, channels: int):
    from edm_jax.nets.model import DiffusionModel
    from edm_jax.nets.song_unet import SongUNet
    from edm_jax.precond import get_precond

    net = SongUNet(resolution, 3, 3, model_channels=channels, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(), dropout=0.0)  # fmt: skip
    model = DiffusionModel(net, get_precond("edm"), resolution, 3)
    return model, model.init(jax.random.key(0))


def main() -> None:
    """Time guided and unguided sampling and the encoders; print one JSON object."""
    p = argparse.ArgumentParser()
    p.add_argument("--clip", default="ViT-B/16", help="CLIP preset or 'tiny'")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    config = TINY if a.clip == "tiny" else clip_model.preset(a.clip)
    clip_params = _random_params(jax.random.key(1), clip_model.param_shapes(config))
    model, params = _model(a.resolution, a.channels)
    x0 = 80 * jax.random.normal(jax.random.key(2), (a.batch, a.resolution, a.resolution, 3))
    sigmas = karras(a.steps, 0.002, 80.0)
    sampler = SAMPLERS["dpmpp_2s_ancestral"]
    target = np.asarray(
        clip_model.l2_normalize(jax.random.normal(jax.random.key(3), (1, config.embed_dim)))
    )
    guided = G.CLIPGuidedModel(model, config, target, (1.0,), 500.0)

    def run_plain(x):
        return sampler(lambda x_, s: jnp.clip(model.denoise(params, x_, s), -1, 1), x, sigmas,
                       rng=jax.random.key(0))  # fmt: skip

    def run_guided(x):
        den = lambda x_, s: guided.denoise((params, clip_params), x_, s, key=jax.random.key(5))  # noqa: E731
        return sampler(den, x, sigmas, rng=jax.random.key(0))

    plain_first, plain = _timed(jax.jit(run_plain), x0, rounds=a.rounds)
    guided_first, guided_t = _timed(jax.jit(run_guided), x0, rounds=a.rounds)
    r = config.image_resolution
    images = jax.random.normal(jax.random.key(4), (a.batch, r, r, 3))
    tokens = (
        jnp.tile(jnp.arange(77, dtype=jnp.int32)[None] + 49000, (a.batch, 1)).at[:, 10].set(49407)
    )
    img_first, img_t = _timed(
        jax.jit(lambda p, x: clip_model.encode_image(p, config, x)),
        clip_params,
        images,
        rounds=a.rounds,
    )
    txt_first, txt_t = _timed(
        jax.jit(lambda p, t: clip_model.encode_text(p, config, t)),
        clip_params,
        tokens,
        rounds=a.rounds,
    )
    calls = 2 * a.steps - 1  # dpmpp_2s_ancestral: two calls a step, one on the last
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "clip": a.clip, "model": f"ddpmpp {a.channels}ch {a.resolution}x{a.resolution}", "batch": a.batch,
        "sampler": "dpmpp_2s_ancestral", "steps": a.steps, "model_calls": calls,
        "unguided_ms_per_step": round(1e3 * plain / a.steps, 2),
        "guided_ms_per_step": round(1e3 * guided_t / a.steps, 2),
        "guided_over_unguided": round(guided_t / plain, 2),
        "compile_s": {"unguided": round(plain_first - plain, 1), "guided": round(guided_first - guided_t, 1)},
        "encode_image_per_s": round(a.batch / img_t, 2), "encode_text_per_s": round(a.batch / txt_t, 2),
        "encode_compile_s": {"image": round(img_first - img_t, 1), "text": round(txt_first - txt_t, 1)},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
