"""Check a real diffusers folder against edm_jax's reader (a development check, not a test).

    # 1. with torch 2.13.0 CPU + diffusers 0.42.1 + transformers (no jax needed):
    python tests/data/diffusers_parity.py make OUT_DIR
    # 2. with the project's venv:
    python tests/data/diffusers_parity.py check OUT_DIR

``make`` builds tiny random SD 1-style and SD 2-style pipelines with diffusers
(``UNet2DConditionModel``, ``AutoencoderKL``, transformers' ``CLIPTextModel`` and
``CLIPTokenizer`` over ../shared/fixtures/bpe_simple_vocab_16e6.txt.gz), saves each with
``StableDiffusionPipeline.save_pretrained`` and records the networks' outputs in refs.npz.
``check`` loads each folder with ``edm_jax.sd.load_pipeline`` and prints JSON: max |diff| /
max |ref| of the U-Net output, the text encoder's last hidden state and the VAE decode, whether
the token ids are equal, and the alphas_cumprod difference.
"""

import json
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
PROMPTS = ["a red cube", "an astronaut riding a horse, digital art", ""]
KINDS = {  # name -> (U-Net extra config, text activation, text layers, pad token, prediction)
    "sd1": (dict(attention_head_dim=4), "quick_gelu", 3, "<|endoftext|>", "epsilon"),
    "sd2": (
        dict(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True),
        "gelu",
        2,
        "!",
        "v_prediction",
    ),
}


def _tokenizer(tmp: Path, pad: str):
    import gzip

    from transformers import CLIPTokenizer

    with gzip.open(FIXTURES / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    base = [chr(c) for c in cs]
    words = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    (tmp / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad)


def make(out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    refs = {}
    for kind, (extra, act, layers, pad, prediction) in KINDS.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, **extra,
        )  # fmt: skip
        for p in unet.parameters():  # diffusers zero-initialises some layers: make all matter
            p.data.normal_(0, 0.05)
        vae = AutoencoderKL(
            block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )  # fmt: skip
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=64,
                intermediate_size=256,
                num_attention_heads=2,
                num_hidden_layers=layers,
                hidden_act=act,
                max_position_embeddings=77,
            )  # fmt: skip
        )
        tmp = out / f"{kind}-tok"
        tmp.mkdir(parents=True, exist_ok=True)
        tok = _tokenizer(tmp, pad)
        sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type=prediction)  # fmt: skip
        pipe = StableDiffusionPipeline(
            vae, text, tok, unet, sched, None, None, requires_safety_checker=False
        )
        pipe.save_pretrained(out / kind)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([10.0, 700.0])
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        ids = torch.tensor(ids)
        z = torch.randn(1, 4, 8, 8, generator=g)
        with torch.no_grad():
            hidden = text(ids).last_hidden_state
            refs[f"{kind}/out"] = unet(x, t, encoder_hidden_states=hidden[:2]).sample.numpy()
            refs[f"{kind}/dec"] = vae.decode(z).sample.numpy()
        refs |= {f"{kind}/x": x.numpy(), f"{kind}/t": t.numpy(), f"{kind}/z": z.numpy()}
        refs |= {f"{kind}/ids": ids.numpy(), f"{kind}/hidden": hidden.numpy()}
        refs[f"{kind}/alphas_cumprod"] = sched.alphas_cumprod.numpy()
    np.savez(out / "refs.npz", **refs)
    print(f"wrote {out}")


def check(out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from edm_jax.sd import load

    with np.load(out / "refs.npz") as f:
        refs = {k: f[k] for k in f.files}

    def rel(a, ref):
        return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())

    result = {}
    for kind in KINDS:
        pipe, params = load.load_pipeline(out / kind, cache=False)
        r = {k.split("/")[1]: v for k, v in refs.items() if k.startswith(kind + "/")}
        ids = pipe.text.tokenize(PROMPTS)
        hidden = pipe.text.apply(params["text"], jnp.asarray(ids))
        nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
        unet_out = pipe.unet.apply(
            {"params": params["unet"]}, nhwc(r["x"]), jnp.asarray(r["t"]), hidden[:2]
        )
        dec = pipe.vae.apply({"params": params["vae"]}, nhwc(r["z"]), method="decode")
        result[kind] = dict(
            variant=pipe.variant, prediction=pipe.prediction,
            token_ids_equal=bool(np.array_equal(ids, r["ids"])),
            text_hidden_maxrel=rel(hidden, r["hidden"]),
            unet_maxrel=rel(np.asarray(unet_out).transpose(0, 3, 1, 2), r["out"]),
            vae_decode_maxrel=rel(np.asarray(dec).transpose(0, 3, 1, 2), r["dec"]),
            alphas_cumprod_maxabs=float(np.abs(pipe.alphas_cumprod - r["alphas_cumprod"]).max()),
        )  # fmt: skip
    print(json.dumps(dict(jax=jax.__version__, folders=result), indent=1))


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](Path(sys.argv[2]))
