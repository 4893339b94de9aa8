"""CLIP weights from OpenAI (``.pt`` TorchScript archives or state_dicts), open_clip and
Hugging Face (``CLIPTextModel``, the Stable Diffusion 1 text encoder) into Flax params.

Files are read by the project's torch-free restricted reader (``edm_jax.nets.reader``).
OpenAI and open_clip name their parameters alike; the Hugging Face text model splits
q/k/v and renames the rest, mapped here onto the same names. Entries that are not
parameters (``input_resolution``, ``context_length``, ``vocab_size``, ``attn_mask``,
``position_ids``) are dropped as ``clip.model.build_model`` does. A state_dict of another
architecture is refused with one line naming its first mismatching key.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from edm_jax.clip import model as clip_model
from edm_jax.nets.convert_openai import check_shapes
from edm_jax.nets.reader import read_state_dict

_NOT_PARAMS = re.compile(
    r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask|position_ids)$"
)
_LINEAR_PARENTS = ("in_proj", "out_proj", "c_fc", "c_proj")


def _torch_key(path: tuple[str, ...]) -> tuple[str, str]:
    """Flax path -> (torch state_dict key, layout): 'linear' [out,in], 'conv' OIHW, or 'same'."""
    tower, *rest = path
    if not rest:
        return tower, "same"
    parts = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", p) for p in rest]
    parts = [f"mlp.{p}" if p in ("c_fc", "c_proj") else p for p in parts]
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    layout = "same"
    if parent == "in_proj":
        parts[-2:] = [f"in_proj_{'weight' if leaf == 'kernel' else 'bias'}"]
        layout = "linear" if leaf == "kernel" else "same"
    elif leaf == "kernel":
        parts[-1], layout = "weight", ("conv" if parent == "conv1" else "linear")
    elif leaf in ("scale", "embedding"):
        parts[-1] = "weight"
    prefix = "visual." if tower == "visual" else ""
    return prefix + ".".join(parts), layout


def _from_torch(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a.transpose(2, 3, 1, 0)
    return a


def _to_torch(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a.transpose(3, 2, 0, 1)
    return a


def name_map(shapes: Any) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """torch key -> (Flax path, layout, torch shape) for a params (or shapes) tree."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        key, layout = _torch_key(path)
        shape = tuple(leaf.shape)
        out[key] = (path, layout, tuple(_to_torch(layout, np.empty(shape, np.bool_)).shape))
    return out


def text_shapes(config: clip_model.CLIPConfig, projection: bool = True) -> dict:
    """Shapes of a text tower's params (no image tower)."""
    tower = clip_model.text_tower(config, projection=projection)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), np.int32)
    return {"text": jax.eval_shape(tower.init, jax.random.key(0), tokens)["params"]}


def from_state_dict(
    state_dict: dict[str, np.ndarray],
    config: clip_model.CLIPConfig,
    *,
    text_only: bool = False,
    projection: bool = True,
    what: str = "CLIP",
) -> dict:
    """An OpenAI / open_clip state_dict -> float32 Flax params of ``CLIP(config)``.

    ``text_only``: the text tower alone (``{'text': ...}``, for ``text_tower``); the image
    tower's and other extra entries are then ignored.
    """
    sd = {k: v for k, v in state_dict.items() if not _NOT_PARAMS.search(k)}
    shapes = text_shapes(config, projection) if text_only else clip_model.param_shapes(config)
    expected = name_map(shapes)
    if text_only:
        sd = {k: v for k, v in sd.items() if not k.startswith("visual.") and k != "logit_scale"}
        if not projection:
            sd.pop("text_projection", None)
    check_shapes(sd, {k: v[2] for k, v in expected.items()}, what)
    flat = {
        path: np.array(_from_torch(layout, np.asarray(sd[key], np.float32)), order="C")
        for key, (path, layout, _) in expected.items()
    }
    return traverse_util.unflatten_dict(flat)


def to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax CLIP params (or a text tower's) -> torch-layout state_dict in OpenAI's names."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    out = {}
    for path, a in flat.items():
        key, layout = _torch_key(path)
        out[key] = np.array(_to_torch(layout, np.asarray(a, np.float32)), order="C")
    return out


_HF_RENAMES = (
    (r"^embeddings\.token_embedding\.", "token_embedding."),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"^final_layer_norm\.", "ln_final."),
)


def hf_text_to_openai(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face ``CLIPTextModel`` names (``text_model.`` stripped) -> OpenAI names; q/k/v fused."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        m = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"text encoder layer {layer}: self_attn has {sorted(parts)} {kind}s, expected q, k, v"
            )
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0
        )
    return out


def load(
    path: str | os.PathLike, model: str | clip_model.CLIPConfig, *, prefix: str | None = None
) -> dict:
    """Flax params of CLIP ``model`` (a preset name or a config) from an OpenAI ``.pt`` (TorchScript
    or state_dict), an open_clip checkpoint or a ``.safetensors`` file, read without torch."""
    config = clip_model.preset(model) if isinstance(model, str) else model
    what = f"CLIP {model}" if isinstance(model, str) else "CLIP"
    return from_state_dict(read_state_dict(path, prefix=prefix), config, what=what)


def _count(sd: dict, pattern: str) -> int:
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def infer_config(state_dict: dict[str, np.ndarray]) -> clip_model.CLIPConfig:
    """The config of OpenAI-style weights, derived as ``clip.model.build_model`` does (heads are
    width // 64, QuickGELU); open_clip models with other head widths need their preset."""
    sd = state_dict
    need = (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "text_projection",
        "ln_final.weight",
    )
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(
            f"weights are not a CLIP ViT state_dict: no {missing[0]!r}; pass --clip-model"
        )
    width, _, patch, _ = np.shape(sd["visual.conv1.weight"])
    grid = round((np.shape(sd["visual.positional_embedding"])[0] - 1) ** 0.5)
    text_width = np.shape(sd["ln_final.weight"])[0]
    return clip_model.CLIPConfig.openai(
        embed_dim=np.shape(sd["text_projection"])[1],
        image_resolution=patch * grid,
        vision_layers=_count(sd, r"^visual\.transformer\.resblocks\.(\d+)\."),
        vision_width=width,
        vision_patch_size=patch,
        context_length=np.shape(sd["positional_embedding"])[0],
        vocab_size=np.shape(sd["token_embedding.weight"])[0],
        transformer_width=text_width,
        transformer_heads=max(text_width // 64, 1),
        transformer_layers=_count(sd, r"^transformer\.resblocks\.(\d+)\."),
    )


def load_any(
    path: str | os.PathLike, model: str | None = None
) -> tuple[dict, clip_model.CLIPConfig]:
    """(params, config) from a CLIP checkpoint: ``model`` a preset name, or None to derive the
    config from the weights (OpenAI-style models)."""
    sd = read_state_dict(path)
    config = clip_model.preset(model) if model else infer_config(sd)
    return from_state_dict(sd, config, what=f"CLIP {model}" if model else "CLIP"), config
