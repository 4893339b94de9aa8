"""diffusers-layout Stable Diffusion folders (``StableDiffusionPipeline.save_pretrained``).

A folder holds ``model_index.json`` and one sub-folder per part: ``unet/`` and ``vae/``
(``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin``),
``text_encoder/`` (HF ``CLIPTextModel``: ``config.json`` + ``model[.fp16].safetensors`` or
``pytorch_model.bin``), ``tokenizer/`` (``vocab.json``, ``merges.txt``, the pad token) and
``scheduler/scheduler_config.json``. Weights are read by the project's one restricted reader.

The U-Net is renamed block by block to CompVis names (``unet_block_map``) and converted as a
single-file checkpoint's is; its config comes from ``config.json`` (heads included), the VAE
is diffusers' own layout, and the text encoder is taken as diffusers runs it: the last hidden
state of the layers the file holds (SD 2 folders keep 23 of OpenCLIP's 24), then the final
LayerNorm. The scheduler gives the alphas_cumprod table and eps / v prediction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "check_tokenizer",
    "compvis_unet_state_dict",
    "is_diffusers_folder",
    "read_folder",
    "source_files",
    "unet_block_map",
    "unet_config",
]

INDEX = "model_index.json"
_WEIGHTS = {  # part -> file stems, in order of preference
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}
_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
# config.json fields the CompVis U-Net has no counterpart for -> the only values accepted
_FIXED = {
    "act_fn": ("silu",), "norm_num_groups": (32,), "flip_sin_to_cos": (True,),
    "freq_shift": (0,), "resnet_time_scale_shift": ("default",), "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None), "class_embed_type": (None,),
    "addition_embed_type": (None,), "encoder_hid_dim": (None,), "time_cond_proj_dim": (None,),
    "only_cross_attention": (False,), "dual_cross_attention": (False,), "num_class_embeds": (None,),
}  # fmt: skip
_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}
_PADS = {"<|endoftext|>": "eot", "!": "zero"}  # HF SD 1 pads with EOT, SD 2 with '!' (id 0)
_RESNET = (
    ("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."),
)  # fmt: skip


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether path is a folder with diffusers' ``model_index.json``."""
    return os.path.isfile(os.path.join(path, INDEX))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"diffusers folder part missing: {path}")
    return json.loads(path.read_text())


def _per_level(value: Any, levels: int, name: str) -> list:
    """An int (or bool) for every level, or a list of one per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"unet config {name}={list(value)} needs {levels} values, one a level")
        return list(value)
    return [value] * levels


def _check_blocks(cfg: dict) -> tuple[list[bool], list[bool]]:
    """(attention per down level, attention per up level) from the block types."""
    for key, allowed in _FIXED.items():
        if cfg.get(key, allowed[0]) not in allowed:
            raise ValueError(
                f"unet config {key}={cfg[key]!r} is not a Stable Diffusion 1/2 U-Net "
                f"(supported: {allowed[0]!r})"
            )
    for key, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        bad = [t for t in cfg[key] if t not in allowed]
        if bad:
            raise ValueError(f"unet config {key} has {bad[0]!r}; supported: {list(allowed)}")
    down = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    if up != down[::-1]:
        raise ValueError(f"unet config up_block_types {cfg['up_block_types']} must mirror the down")
    return down, up


def _heads(cfg: dict, chans: list[int], attn: list[bool]) -> dict[str, int]:
    """num_heads (one count everywhere) or num_head_channels (one width everywhere)."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if not isinstance(heads, (list, tuple)):
        return dict(num_heads=int(heads))
    per = _per_level(heads, len(chans), "attention_head_dim")
    widths = {c // h for c, h, a in zip(chans, per, attn, strict=True) if a} | {
        chans[-1] // per[-1]
    }
    if len(widths) != 1:
        raise ValueError(
            f"unet config attention_head_dim {per} gives head widths {sorted(widths)}; the "
            "CompVis U-Net needs one head count or one head width for every level"
        )
    return dict(num_head_channels=widths.pop())


def unet_config(cfg: dict) -> tuple[dict[str, Any], str]:
    """(ldm_unet kwargs, 'sd1' | 'sd2') of a diffusers ``UNet2DConditionModel`` config."""
    down, _ = _check_blocks(cfg)
    chans = [int(c) for c in cfg["block_out_channels"]]
    levels = len(chans)
    nrb = set(_per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block"))
    depth = set(_per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer"))
    context = cfg.get("cross_attention_dim", 1280)
    if len(nrb) != 1 or len(depth) != 1 or not isinstance(context, int):
        raise ValueError(
            "unet config: layers_per_block, transformer_layers_per_block and "
            "cross_attention_dim must be one value for every level (SD 1/2 U-Nets)"
        )
    if any(c % chans[0] for c in chans):
        raise ValueError(f"unet config block_out_channels {chans} are not multiples of the first")
    linear = bool(cfg.get("use_linear_projection", False))
    kwargs = dict(
        image_size=int(cfg.get("sample_size", 64)),
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        model_channels=chans[0],
        attention_resolutions=tuple(2**i for i in reversed(range(levels)) if down[i]),
        num_res_blocks=nrb.pop(),
        channel_mult=tuple(c // chans[0] for c in chans),
        context_dim=int(context),
        transformer_depth=int(depth.pop()),
        use_linear_in_transformer=linear,
        **_heads(cfg, chans, down),
    )
    return kwargs, "sd2" if linear else "sd1"


def unet_block_map(cfg: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, CompVis prefix, is a ResNet block) for every block of the U-Net."""
    down, up = _check_blocks(cfg)
    levels = len(down)
    nrb = int(_per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")[0])
    out = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
    ]
    for i in range(levels):
        for j in range(nrb):
            k = 1 + i * (nrb + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            if down[i]:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
        if i < levels - 1:
            k = (i + 1) * (nrb + 1)
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", False))
        for j in range(nrb + 1):
            k = i * (nrb + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            if up[i]:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
        if i < levels - 1:
            k, at = i * (nrb + 1) + nrb, 2 if up[i] else 1
            out.append(
                (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{at}.conv.", False)
            )
    return out


def compvis_unet_state_dict(sd: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """A diffusers U-Net state_dict in CompVis ``model.diffusion_model`` names (no prefix)."""
    blocks = sorted(unet_block_map(cfg), key=lambda b: -len(b[0]))  # longest prefix first
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        block = next((b for b in blocks if key.startswith(b[0])), None)
        if block is None:
            raise ValueError(f"unet weight {key!r} belongs to no block of the config's U-Net")
        rest = key[len(block[0]) :]
        if block[2]:
            rest = next((c + rest[len(d) :] for d, c in _RESNET if rest.startswith(d)), rest)
        out[block[1] + rest] = value
    return out


def _weights(folder: Path, part: str) -> Path:
    """The part's weight file (safetensors preferred over torch .bin, full over fp16)."""
    for stem in _WEIGHTS[part]:
        for suffix in _SUFFIXES:
            if (folder / part / (stem + suffix)).is_file():
                return folder / part / (stem + suffix)
    names = [s + x for s in _WEIGHTS[part] for x in _SUFFIXES]
    raise FileNotFoundError(f"diffusers folder {folder}: no {part} weights ({', '.join(names)})")


def _text_options(folder: Path, text_cfg: dict) -> dict[str, Any]:
    """Text config fields the weights do not fix: activation, last layer, padding."""
    act = text_cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_encoder hidden_act {act!r}; supported: 'quick_gelu', 'gelu'")
    tok = folder / "tokenizer"
    special: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tok / name).is_file():
            special = {**json.loads((tok / name).read_text()), **special}
    pad = special.get("pad_token", "<|endoftext|>")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad not in _PADS:
        raise ValueError(f"tokenizer pad_token {pad!r}; supported: {sorted(_PADS)}")
    return dict(activation=act, layer=-1, pad=_PADS[pad])


def _schedule(folder: Path) -> tuple[np.ndarray, str]:
    """(alphas_cumprod, 'eps' | 'v') of scheduler/scheduler_config.json."""
    from edm_jax.wrappers import diffusers_alphas_cumprod

    cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in _PREDICTION:
        raise ValueError(f"scheduler prediction_type {kind!r}; supported: {sorted(_PREDICTION)}")
    if "trained_betas" in cfg and cfg["trained_betas"] is not None:
        raise ValueError("scheduler trained_betas are not supported; give beta_schedule instead")
    ac = diffusers_alphas_cumprod(
        cfg.get("beta_schedule", "linear"), int(cfg.get("num_train_timesteps", 1000)),
        float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02)),
        bool(cfg.get("rescale_betas_zero_snr", False)),
    )  # fmt: skip
    return ac, _PREDICTION[kind]


def source_files(folder: str | os.PathLike) -> list[Path]:
    """Every file a conversion reads (for the cache's source id)."""
    f = Path(folder)
    configs = [f / INDEX, f / "unet/config.json", f / "vae/config.json",
               f / "text_encoder/config.json", f / "scheduler/scheduler_config.json"]  # fmt: skip
    return configs + [_weights(f, part) for part in _WEIGHTS]


def check_tokenizer(folder: str | os.PathLike) -> Path:
    """The tokenizer's merges (merges.txt, else tokenizer.json), checked to give the folder's
    vocabulary (vocab.json, or tokenizer.json's): CLIP's BPE."""
    from edm_jax.clip.tokenizer import default_tokenizer

    tok = Path(folder) / "tokenizer"
    if (tok / "merges.txt").is_file():
        merges, vocab = tok / "merges.txt", _read_json(tok / "vocab.json")
    else:
        merges = tok / "tokenizer.json"
        vocab = _read_json(merges)["model"]["vocab"]
    if default_tokenizer(str(merges)).encoder != vocab:  # the text encoder reuses this one
        raise ValueError(f"{tok}: the vocabulary is not the CLIP vocabulary its merges make")
    return merges


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict, str]:
    """(configs, float32 Flax params, 'eps' | 'v') of every network of a diffusers SD folder."""
    import dataclasses

    from edm_jax.nets import convert_openai, ldm_unet, vae
    from edm_jax.nets.reader import read_state_dict
    from edm_jax.sd import text as sd_text

    f = Path(folder)
    ucfg = _read_json(f / "unet" / "config.json")
    unet_kwargs, variant = unet_config(ucfg)
    unet_sd = compvis_unet_state_dict(read_state_dict(str(_weights(f, "unet"))), ucfg)
    net = ldm_unet.ldm_unet(**unet_kwargs)
    unet = convert_openai.from_openai_state_dict(unet_sd, net, family=variant)
    vcfg = vae.VAEConfig.from_diffusers(_read_json(f / "vae" / "config.json"))
    vae_params = vae.from_state_dict(vae.build_vae(vcfg), read_state_dict(str(_weights(f, "vae"))))
    tcfg = _read_json(f / "text_encoder" / "config.json")
    tsd = read_state_dict(str(_weights(f, "text_encoder")))
    options = _text_options(f, tcfg) | dict(heads=int(tcfg.get("num_attention_heads", 12)))
    text_cfg, text = sd_text.convert_text_encoder(
        "sd1", {"transformer." + k: v for k, v in tsd.items()}, **options
    )
    ac, prediction = _schedule(f)
    configs = dict(unet=unet_kwargs, vae=dataclasses.asdict(vcfg), text=text_cfg,
                   alphas_cumprod=ac.tolist(), variant=variant)  # fmt: skip
    return configs, dict(unet=unet, vae=vae_params, text=text), prediction
