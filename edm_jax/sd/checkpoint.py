"""Released Stable Diffusion single-file checkpoints (.ckpt / .safetensors), read without torch.

A CompVis/Stability file holds three networks under prefixes: the U-Net under
``model.diffusion_model.`` (and its EMA copy under ``model_ema.``), the VAE under
``first_stage_model.`` (CompVis names: ``encoder.down.0.block.0...``) and the text encoder
under ``cond_stage_model.`` (SD 1: HF ``CLIPTextModel`` names under ``transformer.``; SD 2:
open_clip names under ``model.``). ``split_checkpoint`` separates them; ``infer_unet_config`` /
``infer_vae_config`` read the architecture from tensor shapes (the head count, which shapes do
not fix, follows the released rule: SD 1 ``num_heads`` 8, SD 2 ``num_head_channels`` 64);
``compvis_vae_state_dict`` renames the VAE to diffusers' names for ``nets.vae.from_state_dict``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from edm_jax.nets.convert_openai import SD_UNET_PREFIX
from edm_jax.nets.ldm_unet import SD_UNETS
from edm_jax.nets.vae import VAEConfig

__all__ = [
    "SD_VARIANTS",
    "SDParts",
    "check_unet_config",
    "compvis_vae_state_dict",
    "infer_unet_config",
    "infer_vae_config",
    "split_checkpoint",
]

VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
# SD version -> (text-encoder key prefix below cond_stage_model., released U-Net configs)
SD_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd1": ("transformer.", ("sd15",)),
    "sd2": ("model.", ("sd21_v", "sd2_base")),
}


@dataclasses.dataclass(frozen=True)
class SDParts:
    """A single-file checkpoint split by network (prefixes stripped) and its SD version."""

    unet: dict[str, np.ndarray]
    vae: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    ema: dict[str, np.ndarray]  # 'model_ema.<name without dots>' entries, prefix kept
    variant: str  # 'sd1' or 'sd2'
    alphas_cumprod: np.ndarray | None = None  # LatentDiffusion's float32 buffer, if saved


def _under(sd: dict[str, np.ndarray], prefix: str, keep: bool = False) -> dict[str, np.ndarray]:
    """Entries whose name starts with prefix (prefix stripped unless keep)."""
    n = 0 if keep else len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _variant(unet: dict[str, np.ndarray], text: dict[str, np.ndarray], where: str) -> str:
    """'sd1' (conv proj_in, CLIP text under transformer.) or 'sd2' (linear proj_in, open_clip)."""
    proj = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    if not proj:
        raise ValueError(f"{where}: the U-Net has no SpatialTransformer (no '*.proj_in.weight')")
    by_unet = "sd1" if proj[0].ndim == 4 else "sd2"
    for name, (prefix, _) in SD_VARIANTS.items():
        if text and any(k.startswith(prefix) for k in text) and name != by_unet:
            raise ValueError(
                f"{where}: the U-Net is {by_unet} (proj_in {proj[0].shape}) but the text encoder "
                f"is {name} (keys under {TEXT_PREFIX + prefix!r}); a mixed checkpoint"
            )
    return by_unet


def split_checkpoint(sd: dict[str, np.ndarray], where: str = "checkpoint") -> SDParts:
    """Split a released single-file state_dict into U-Net, VAE, text encoder and EMA parts."""
    unet = _under(sd, SD_UNET_PREFIX)
    if not unet:
        first = list(sd)[:4]
        raise ValueError(
            f"{where} is not a Stable Diffusion checkpoint: no {SD_UNET_PREFIX!r} keys "
            f"(first keys: {first})"
        )
    for prefix in (VAE_PREFIX, TEXT_PREFIX):
        if not any(k.startswith(prefix) for k in sd):
            raise ValueError(f"{where}: no {prefix!r} keys; a full SD checkpoint holds all three")
    text = _under(sd, TEXT_PREFIX)
    vae = {k: v for k, v in _under(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    ac = sd.get("alphas_cumprod")  # k-diffusion's CompVisDenoiser reads model.alphas_cumprod
    ac = None if ac is None else np.asarray(ac, np.float32).reshape(-1)
    ema = _under(sd, EMA_PREFIX, keep=True)
    return SDParts(unet, vae, text, ema, _variant(unet, text, where), ac)


def _count(keys, pattern: str) -> int:
    """1 + the largest integer the pattern's group captures in keys (0 if none matches)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _levels(unet: dict[str, np.ndarray]) -> tuple[int, int]:
    """(number of resolution levels, res blocks per level) from the input-block layout."""
    downs = sorted(
        int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k))
    )
    n_in = _count(unet, r"input_blocks\.(\d+)\.")
    if not downs:
        return 1, n_in - 1
    return len(downs) + 1, downs[0] - 1


def infer_unet_config(unet: dict[str, np.ndarray], variant: str) -> dict[str, Any]:
    """``ldm_unet`` keyword arguments of a U-Net state_dict, read from its shapes.

    Heads follow the released configs (SD 1: num_heads 8; SD 2: num_head_channels 64).
    """
    mc = int(unet["input_blocks.0.0.weight"].shape[0])
    levels, nrb = _levels(unet)
    mult, attn = [], []
    for lv in range(levels):
        i = 1 + lv * (nrb + 1)  # first ResBlock of the level
        mult.append(int(unet[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]) // mc)
        if f"input_blocks.{i}.1.proj_in.weight" in unet:
            attn.append(2**lv)
    to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    depth = _count(unet, r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.")
    heads = dict(num_heads=8) if variant == "sd1" else dict(num_head_channels=64)
    return dict(
        image_size=32,
        in_channels=int(unet["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(unet["out.2.weight"].shape[0]),
        model_channels=mc,
        attention_resolutions=tuple(reversed(attn)),  # the yamls' order (4, 2, 1)
        num_res_blocks=nrb,
        channel_mult=tuple(mult),
        context_dim=int(to_k.shape[1]),
        transformer_depth=depth,
        use_linear_in_transformer=variant == "sd2",
        **heads,
    )


def check_unet_config(config: str | dict, inferred: dict, variant: str) -> dict[str, Any]:
    """The ldm_unet kwargs of ``config`` (a released name or kwargs), checked against the file."""
    if isinstance(config, str):
        if config not in SD_UNETS:
            from edm_jax.checks import did_you_mean

            raise ValueError(
                f"unknown Stable Diffusion config {config!r}{did_you_mean(config, SD_UNETS)}; "
                f"valid: {sorted(SD_UNETS)}"
            )
        config = dict(SD_UNETS[config])
    for key in ("context_dim", "model_channels", "use_linear_in_transformer"):
        want = config.get(key, False)
        if key in inferred and want != inferred[key]:
            hint = "/".join(SD_VARIANTS[variant][1])
            raise ValueError(
                f"the checkpoint is {variant.upper()} ({key}={inferred[key]}) but the config has "
                f"{key}={want}; use config {hint!r} or one matching the file"
            )
    return dict(config)


# ---- the VAE: CompVis names -> diffusers names


def infer_vae_config(vae: dict[str, np.ndarray], scaling_factor: float = 0.18215) -> VAEConfig:
    """The VAEConfig of a CompVis VAE state_dict (channels, blocks per level, latent size)."""
    if "encoder.conv_in.weight" not in vae:
        raise ValueError(
            f"the VAE part has no 'encoder.conv_in.weight' (first keys: {list(vae)[:4]})"
        )
    levels = _count(vae, r"encoder\.down\.(\d+)\.")
    chans = tuple(
        int(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)
    )
    return VAEConfig(
        in_channels=int(vae["encoder.conv_in.weight"].shape[1]),
        out_channels=int(vae["decoder.conv_out.weight"].shape[0]),
        block_out_channels=chans,
        layers_per_block=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=int(vae["post_quant_conv.weight"].shape[0]),
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in vae,
        scaling_factor=scaling_factor,
    )


_VAE_RULES = (  # (CompVis pattern, diffusers replacement); {n} = number of levels - 1 - i
    (r"^(encoder)\.down\.(\d+)\.block\.(\d+)\.", r"\1.down_blocks.\2.resnets.\3."),
    (r"^(encoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0."),
    (r"^(decoder)\.up\.(\d+)\.block\.(\d+)\.", "{up}.resnets.\\3."),
    (r"^(decoder)\.up\.(\d+)\.upsample\.", "{up}.upsamplers.0."),
    (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)


def _vae_name(name: str, levels: int) -> str:
    """diffusers name of one CompVis VAE name (decoder levels are numbered in reverse)."""
    for pattern, repl in _VAE_RULES:
        m = re.search(pattern, name)
        if m is None:
            continue
        if isinstance(repl, str) and "{up}" in repl:
            up = f"decoder.up_blocks.{levels - 1 - int(m.group(2))}"
            repl = repl.replace("{up}", up)
        name = re.sub(pattern, repl, name, count=1)
    return name


def compvis_vae_state_dict(vae: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A CompVis ``first_stage_model`` state_dict (prefix stripped) in diffusers' names."""
    levels = _count(vae, r"decoder\.up\.(\d+)\.")
    return {_vae_name(k, levels): v for k, v in vae.items()}
