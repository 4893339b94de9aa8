"""Text-to-image beside diffusers' StableDiffusionPipeline, same weights and sampler (JSON).

    python benchmarks/bench_t2i_vs_diffusers.py                  # reduced pipeline (CPU)
    python benchmarks/bench_t2i_vs_diffusers.py --full --size 512 --half   # SD 1.5 (GPU)

Needs torch, diffusers and transformers beside jax (none is a dependency of edm_jax). diffusers
builds a random pipeline (the SD 1.5 architecture with ``--full``: U-Net, sd-vae-ft-mse VAE,
CLIP ViT-L/14 text encoder; else a reduced one sized for a CPU) and saves it with
``save_pretrained``; edm_jax loads that folder (``load_pipeline``), so both run the same
weights. Both sample DPM++ 2M with Karras sigmas (diffusers' ``DPMSolverMultistepScheduler``,
``use_karras_sigmas``; ours ``dpmpp_2m`` + ``karras``), CFG 7.5, prompt encoding and VAE decode
included. ``--half``: fp16 with SDPA for diffusers, bfloat16 U-Net for edm_jax. Per batch size:
seconds to the first images (compile / warm-up included) and images/s over ``--repeats``
calls, the two pipelines' rounds interleaved.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = Path(__file__).resolve().parents[1].parent / "shared/fixtures/bpe_simple_vocab_16e6.txt.gz"
REDUCED = dict(
    unet=dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
              cross_attention_dim=128, attention_head_dim=4),
    vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
    text=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2),
)  # fmt: skip
FULL = dict(
    unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),  # SD 1.5
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),  # sd-vae-ft-mse
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12),  # CLIP ViT-L/14's text tower
)  # fmt: skip


def _tokenizer_files(folder: Path, vocab: Path) -> None:
    """vocab.json + merges.txt of CLIP's BPE file, as the released SD folders hold them."""
    from edm_jax.clip.tokenizer import Tokenizer

    with gzip.open(vocab, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "vocab.json").write_text(json.dumps(Tokenizer(vocab).encoder))


def make_pipeline(folder: Path, full: bool, vocab: Path):
    """A random diffusers pipeline, saved to folder (weights in float32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = FULL if full else REDUCED
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
        latent_channels=4, **cfg["vae"],
    )  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu", **cfg["text"]))  # fmt: skip
    _tokenizer_files(folder / "tok", vocab)
    tok = CLIPTokenizer(str(folder / "tok/vocab.json"), str(folder / "tok/merges.txt"),
                        model_max_length=77)  # fmt: skip
    sched = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(vae, text, tok, unet, sched, None, None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder / "sd")
    return pipe


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(pipe, folder: Path, args) -> list[dict]:
    """Per batch size: first-call seconds and images/s of both, rounds interleaved."""
    import jax
    import jax.numpy as jnp
    import torch

    from edm_jax.sd import generate, load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device, torch.float16 if args.half else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ours, params = load.load_pipeline(folder / "sd", cache=False,
                                      dtype=jnp.bfloat16 if args.half else jnp.float32)  # fmt: skip
    out = []
    for batch in args.batches:
        kw = dict(height=args.size, width=args.size)

        def theirs(r, batch=batch, kw=kw):
            g = torch.Generator(device).manual_seed(r)
            pipe([f"a photo {r}"] * batch, num_inference_steps=args.steps, guidance_scale=7.5,
                 generator=g, output_type="np", **kw)  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()

        def mine(r, batch=batch, kw=kw):
            seeds = range(r * batch, (r + 1) * batch)
            generate.text_to_image(jax.random.key(0), ours, params, f"a photo {r}", seeds=seeds,
                                   sampler="dpmpp_2m", schedule="karras", steps=args.steps,
                                   cfg_scale=7.5, batch_size=batch, **kw)  # fmt: skip

        first = dict(edm_jax=_timed(lambda: mine(0)), diffusers=_timed(lambda: theirs(0)))
        times: dict[str, list[float]] = dict(edm_jax=[], diffusers=[])
        for r in range(1, args.repeats + 1):
            times["edm_jax"].append(_timed(lambda r=r: mine(r)))
            times["diffusers"].append(_timed(lambda r=r: theirs(r)))
        ips = {k: batch / float(np.median(v)) for k, v in times.items()}
        out.append(dict(
            batch=batch,
            seconds_to_first_images={k: round(v, 3) for k, v in first.items()},
            images_per_s={k: round(v, 4) for k, v in ips.items()},
            speedup=round(ips["edm_jax"] / ips["diffusers"], 3),
        ))  # fmt: skip
    return out


def main() -> None:
    from bench_t2i import add_arguments  # run as benchmarks/<script>: its folder is on the path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--half", action="store_true", help="fp16 (diffusers) / bf16 U-Net (ours)")
    p.add_argument("--vocab", type=Path, default=VOCAB, help="CLIP's bpe_simple_vocab_16e6.txt.gz")
    args = p.parse_args()
    import diffusers
    import jax
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        pipe = make_pipeline(Path(tmp), args.full, args.vocab)
        results = compare(pipe, Path(tmp), args)
    print(json.dumps(dict(
        benchmark="text_to_image beside diffusers: DPM++ 2M Karras, cfg 7.5, same weights",
        model="SD 1.5 architecture" if args.full else f"reduced random pipeline {REDUCED}",
        size=args.size, steps=args.steps, half=args.half, jax_device=str(jax.devices()[0]),
        torch_device="cuda" if torch.cuda.is_available() else "cpu",
        torch_threads=torch.get_num_threads(), versions=dict(
            jax=jax.__version__, torch=torch.__version__, diffusers=diffusers.__version__),
        results=results,
    ), indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
