"""``load_pipeline``: a released SD checkpoint -> (StableDiffusion, params), cached.

A single file (.ckpt through the restricted reader, or .safetensors) is split by prefix, each
network's architecture read from its shapes (or given); a diffusers folder is read part by part
(``sd.diffusers_folder``). Either is converted to Flax parameters once and cached beside it as
``<name>.edm_jax[-ema].npz`` (written atomically; reused while the sources' sizes and mtimes,
and the options, are unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.nets import convert_openai, ldm_unet, vae
from edm_jax.sd import checkpoint as ck
from edm_jax.sd import diffusers_folder
from edm_jax.sd import text as sd_text
from edm_jax.sd.pipeline import PREDICTIONS, StableDiffusion

__all__ = ["convert_unet", "convert_vae", "describe", "is_sd_checkpoint", "load_pipeline"]

SD_SUFFIXES = (".ckpt", ".safetensors")
_CACHE_VERSION = 1


def is_sd_checkpoint(path: str | os.PathLike) -> bool:
    """Whether path names a single-file SD checkpoint (.ckpt / .safetensors, by its suffix) or
    a diffusers folder (with model_index.json)."""
    return os.fspath(path).endswith(SD_SUFFIXES) or diffusers_folder.is_diffusers_folder(path)


def _prediction(prediction: str | None, config: Any, configs: dict, path: str) -> str:
    """eps / v: given, else the folder's scheduler's, else the released config's, else SD 2
    files named '768' are v."""
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {sorted(PREDICTIONS)}")
        return prediction
    if "prediction" in configs:
        return configs["prediction"]
    variant = configs["variant"]
    if isinstance(config, str) and config in ldm_unet.SD_PREDICTION:
        return ldm_unet.SD_PREDICTION[config]
    return "v" if variant == "sd2" and "768" in os.path.basename(path) else "eps"


def convert_unet(parts: ck.SDParts, config: Any = None, ema: bool = False) -> tuple[dict, dict]:
    """(ldm_unet kwargs, Flax params) of a split checkpoint's U-Net (or its EMA copy)."""
    unet_cfg = ck.infer_unet_config(parts.unet, parts.variant)
    if config is not None:
        unet_cfg = ck.check_unet_config(config, unet_cfg, parts.variant)
    net = ldm_unet.ldm_unet(**unet_cfg)
    unet_sd = convert_openai.sd_ema_state_dict(parts.ema, net) if ema else parts.unet
    return unet_cfg, convert_openai.from_openai_state_dict(unet_sd, net, family=parts.variant)


def convert_vae(parts: ck.SDParts, **overrides: Any) -> tuple[vae.VAEConfig, dict]:
    """(VAEConfig, Flax params) of a split checkpoint's CompVis VAE (overrides: config fields)."""
    cfg = dataclasses.replace(ck.infer_vae_config(parts.vae), **overrides)
    return cfg, vae.from_state_dict(vae.build_vae(cfg), ck.compvis_vae_state_dict(parts.vae))


def _convert(parts: ck.SDParts, config: Any, ema: bool) -> tuple[dict, dict]:
    """(configs, params) of every network of a split checkpoint (float32 numpy leaves)."""
    unet_cfg, unet_params = convert_unet(parts, config, ema)
    vae_cfg, vae_params = convert_vae(parts)
    text_cfg, text_params = sd_text.convert_text_encoder(parts.variant, parts.text)
    configs = dict(unet=unet_cfg, vae=dataclasses.asdict(vae_cfg), text=text_cfg)
    if parts.alphas_cumprod is not None:  # the file's schedule (else the LDM linear one)
        configs["alphas_cumprod"] = parts.alphas_cumprod.tolist()
    params = dict(unet=unet_params, vae=vae_params, text=text_params)
    return configs, jax.tree.map(np.asarray, params)


def _cache_path(path: str, ema: bool, cache_dir: str | None) -> Path:
    """Where the converted parameters of path are cached."""
    p = Path(path)
    folder = Path(cache_dir) if cache_dir else p.parent
    return folder / f"{p.name}.edm_jax{'-ema' if ema else ''}.npz"


def _source_id(path: str, config: Any) -> dict:
    """What a cache must match: the source files' sizes and mtimes, the config asked for."""
    files = diffusers_folder.source_files(path) if os.path.isdir(path) else [Path(path)]
    stats = {f.name if len(files) == 1 else str(f.relative_to(path)): os.stat(f) for f in files}
    sizes = {k: [st.st_size, st.st_mtime_ns] for k, st in stats.items()}
    return dict(version=_CACHE_VERSION, files=sizes, config=config)


def _write_cache(cache: Path, source: dict, configs: dict, params: dict) -> None:
    """params flattened as 'unet/a/b' arrays + meta_json, written atomically."""
    from edm_jax.fileio import atomic_open

    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    meta = json.dumps(dict(source=source, configs=configs))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(cache, "wb") as f:
        np.savez(f, meta_json=np.asarray(meta), **flat)


def _read_cache(cache: Path, source: dict) -> tuple[dict, dict] | None:
    """(configs, params) of a cache made from the same source and options, else None."""
    if not cache.is_file():
        return None
    with np.load(cache) as f:
        meta = json.loads(str(f["meta_json"]))
        if meta["source"] != json.loads(json.dumps(source)):
            return None
        flat = {tuple(k.split("/")): f[k] for k in f.files if k != "meta_json"}
    return meta["configs"], traverse_util.unflatten_dict(flat)


def _build(
    configs: dict, variant: str, prediction: str, dtype: Any, vocab: str | None
) -> StableDiffusion:
    """The pipeline object of converted configs."""
    cfg = dict(configs["unet"])
    for key in ("attention_resolutions", "channel_mult"):
        cfg[key] = tuple(cfg[key])
    vcfg = dict(configs["vae"], block_out_channels=tuple(configs["vae"]["block_out_channels"]))
    saved = configs.get("alphas_cumprod")  # the file's buffer, else the LDM linear schedule
    schedule = {} if saved is None else {"alphas_cumprod": np.asarray(saved, np.float32)}
    return StableDiffusion(
        unet=ldm_unet.ldm_unet(**cfg, dtype=dtype),
        vae=vae.build_vae(vae.VAEConfig(**vcfg)),
        text=sd_text.text_encoder(variant, configs["text"], vocab),
        prediction=prediction,
        variant=variant,
        **schedule,
    )


def load_pipeline(
    path: str | os.PathLike, *, config: str | dict | None = None, prediction: str | None = None,
    ema: bool = False, cache: bool = True, cache_dir: str | None = None, dtype: Any = jnp.float32,
    vocab: str | os.PathLike | None = None,
) -> tuple[StableDiffusion, dict]:  # fmt: skip
    """(pipeline, params) of a released SD .ckpt / .safetensors file or a diffusers folder.

    ``config``: a released U-Net name ('sd15', 'sd21_v', 'sd2_base') or ldm_unet kwargs (default:
    read from the file's shapes); a config of the other SD version is refused. ``prediction``:
    'eps' or 'v' (default: the config's, else 'v' for SD 2 files whose name has '768').
    ``ema``: the 'model_ema.' U-Net. ``dtype``: the U-Net's compute dtype (bf16 on GPUs).
    ``vocab``: the CLIP BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz; a diffusers
    folder's default is its tokenizer/merges.txt).
    """
    where = os.fspath(path).rstrip("/") or "/"
    folder = _check_source(where, config, ema)
    source = _source_id(where, config)
    cache_file = _cache_path(where, ema, cache_dir)
    found = _read_cache(cache_file, source) if cache else None
    if found is None:
        configs, params = _convert_source(where, folder, config, ema)
        if cache:
            _write_cache(cache_file, source, configs, params)
    else:
        configs, params = found
    if vocab is None and folder:
        vocab = diffusers_folder.check_tokenizer(where)
    pipe = _build(
        configs,
        configs["variant"],
        _prediction(prediction, config, configs, where),
        dtype,
        None if vocab is None else os.fspath(vocab),
    )
    return pipe, jax.tree.map(jnp.asarray, params)


def _check_source(where: str, config: Any, ema: bool) -> bool:
    """True for a diffusers folder, False for a single file; one line for anything else."""
    if os.path.isdir(where):
        if not diffusers_folder.is_diffusers_folder(where):
            raise ValueError(
                f"{where} is a folder without {diffusers_folder.INDEX}: an SD checkpoint is a "
                f"{' or '.join(SD_SUFFIXES)} file or a diffusers StableDiffusionPipeline folder"
            )
        if ema or config is not None:
            raise ValueError(
                f"{where}: ema and config apply to single-file checkpoints; a diffusers folder "
                "has one U-Net, described by its unet/config.json"
            )
        return True
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no such checkpoint: {where}")
    if not is_sd_checkpoint(where):
        raise ValueError(
            f"{where}: an SD checkpoint is a {' or '.join(SD_SUFFIXES)} file or a diffusers folder"
        )
    return False


def _convert_source(where: str, folder: bool, config: Any, ema: bool) -> tuple[dict, dict]:
    """(configs, float32 params) of a folder or a single file."""
    if folder:
        configs, params, prediction = diffusers_folder.read_folder(where)
        return configs | dict(prediction=prediction), jax.tree.map(np.asarray, params)
    from edm_jax.nets import reader

    parts = ck.split_checkpoint(reader.read_state_dict(where), where)
    configs, params = _convert(parts, config, ema)
    configs["variant"] = parts.variant
    return configs, params


def describe(pipe: StableDiffusion) -> str:
    """One line: version, prediction, U-Net width and context."""
    u = pipe.unet
    return (
        f"{pipe.variant.upper()} ({pipe.prediction}-prediction), U-Net {u.model_channels} "
        f"channels x{list(u.channel_mult)}, context {u.context_dim}"
    )
