"""k-diffusion JSON configs read as k-diffusion reads them (``K.config.load_config``).

``load_config(path_or_dict)`` deep-merges the model type's defaults under the file's values
(jsonmerge's default strategy: objects merge recursively, anything else is replaced), fills
the derived values (image_transformer_v1 ``d_ff``; HDiT ``mapping_d_ff``, ``d_ffs``,
``self_attns``, per-level ``dropout_rate``), then merges the global defaults under that.
Before any of it, ``check_config`` rejects a section or key k-diffusion does not have, with a
did-you-mean, and an unknown model type, naming the valid ones.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from edm_jax.checks import check_choice, did_you_mean

_DEFAULTS_BY_TYPE: dict[str, dict] = {
    "image_v1": {
        "model": {
            "patch_size": 1,
            "augment_wrapper": True,
            "mapping_cond_dim": 0,
            "unet_cond_dim": 0,
            "cross_cond_dim": 0,
            "cross_attn_depths": None,
            "skip_stages": 0,
            "has_variance": False,
        },
        "optimizer": {
            "type": "adamw",
            "lr": 1e-4,
            "betas": [0.95, 0.999],
            "eps": 1e-6,
            "weight_decay": 1e-3,
        },
    },
    "image_transformer_v1": {
        "model": {"d_ff": 0, "augment_wrapper": False, "skip_stages": 0, "has_variance": False},
        "optimizer": {
            "type": "adamw",
            "lr": 5e-4,
            "betas": [0.9, 0.99],
            "eps": 1e-8,
            "weight_decay": 1e-4,
        },
    },
    "image_transformer_v2": {
        "model": {
            "mapping_width": 256,
            "mapping_depth": 2,
            "mapping_d_ff": None,
            "mapping_cond_dim": 0,
            "mapping_dropout_rate": 0.0,
            "d_ffs": None,
            "self_attns": None,
            "dropout_rate": None,
            "augment_wrapper": False,
            "skip_stages": 0,
            "has_variance": False,
        },
        "optimizer": {
            "type": "adamw",
            "lr": 5e-4,
            "betas": [0.9, 0.99],
            "eps": 1e-8,
            "weight_decay": 1e-4,
        },
    },
}

DEFAULTS: dict[str, dict] = {
    "model": {
        "sigma_data": 1.0,
        "dropout_rate": 0.0,
        "augment_prob": 0.0,
        "loss_config": "karras",
        "loss_weighting": "karras",
        "loss_scales": 1,
    },
    "dataset": {"type": "imagefolder", "num_classes": 0, "cond_dropout_rate": 0.1},
    "optimizer": {
        "type": "adamw",
        "lr": 1e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 1e-4,
    },
    "lr_sched": {"type": "constant", "warmup": 0.0},
    "ema_sched": {"type": "inverse", "power": 0.6667, "max_value": 0.9999},
}

_COMMON_MODEL_KEYS = (
    "type input_channels input_size patch_size sigma_data sigma_min sigma_max sigma_sample_density "
    "dropout_rate augment_prob loss_config loss_weighting loss_scales augment_wrapper skip_stages "
    "has_variance"
).split()
MODEL_KEYS: dict[str, frozenset[str]] = {
    "image_v1": frozenset(
        _COMMON_MODEL_KEYS
        + "mapping_out depths channels self_attn_depths cross_attn_depths mapping_cond_dim "
        "unet_cond_dim cross_cond_dim".split()
    ),
    "image_transformer_v1": frozenset(_COMMON_MODEL_KEYS + ["depth", "width", "d_ff"]),
    "image_transformer_v2": frozenset(
        _COMMON_MODEL_KEYS
        + "depths widths d_ffs self_attns mapping_width mapping_depth mapping_d_ff "
        "mapping_cond_dim mapping_dropout_rate".split()
    ),
}
SECTION_KEYS: dict[str, frozenset[str]] = {  # the keys k-diffusion's train.py reads
    "dataset": frozenset(
        "type location num_classes cond_dropout_rate image_key class_key get_dataset config".split()
    ),
    "optimizer": frozenset("type lr betas eps weight_decay momentum nesterov".split()),
    "lr_sched": frozenset("type warmup inv_gamma power min_lr num_steps decay".split()),
    "ema_sched": frozenset("type power max_value".split()),
}


def merge(base: Any, head: Any) -> Any:
    """jsonmerge.merge with the default strategy: dicts merge recursively, head wins otherwise."""
    if isinstance(base, dict) and isinstance(head, dict):
        out = copy.deepcopy(base)
        for k, v in head.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(head)


def round_to_power_of_two(x: float, tol: float) -> int:
    """k-diffusion config.round_to_power_of_two: the coarsest multiple of 2^i within tol of x."""
    approxs = [round(x / 2**i) * 2**i for i in range(math.ceil(math.log2(x)))]
    for approx in reversed(approxs):
        if abs((approx - x) / x) <= tol:
            return approx
    return approxs[0]


def _unknown(where: str, keys, valid) -> None:
    """Raise ValueError for the first key not in valid, with a did-you-mean and the valid keys."""
    for key in keys:
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} in k-diffusion config {where}{did_you_mean(key, valid)}; "
                f"valid: {sorted(valid)}"
            )


def check_config(config: dict) -> None:
    """One clear error for an unknown section, model type or key (k-diffusion does not have it)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError("a k-diffusion config is a JSON object with a 'model' section")
    _unknown("(top level)", config, ["model", *SECTION_KEYS])
    check_choice("k-diffusion model type", config["model"].get("type"), MODEL_KEYS)
    _unknown("section 'model'", config["model"], MODEL_KEYS[config["model"]["type"]])
    for section, valid in SECTION_KEYS.items():
        if section in config:
            if not isinstance(config[section], dict):
                raise ValueError(f"k-diffusion config section {section!r} must be an object")
            _unknown(f"section {section!r}", config[section], valid)


def _fill_v2(model: dict) -> None:
    """HDiT derived defaults: mapping_d_ff, d_ffs (3 w), self_attns, per-level dropout_rate."""
    n = len(model["widths"])
    if not model["mapping_d_ff"]:
        model["mapping_d_ff"] = model["mapping_width"] * 3
    if not model["d_ffs"]:
        model["d_ffs"] = [w * 3 for w in model["widths"]]
    if not model["self_attns"]:
        neighborhood = {"type": "neighborhood", "d_head": 64, "kernel_size": 7}
        model["self_attns"] = [
            dict(neighborhood) if i < n - 1 else {"type": "global", "d_head": 64} for i in range(n)
        ]
    if model["dropout_rate"] is None:
        model["dropout_rate"] = [0.0] * n
    elif isinstance(model["dropout_rate"], float):
        model["dropout_rate"] = [model["dropout_rate"]] * n


def load_config(path_or_dict: str | os.PathLike | dict) -> dict:
    """A k-diffusion config (JSON file or dict) with its defaults filled, as K.config.load_config."""
    if isinstance(path_or_dict, dict):
        config = copy.deepcopy(path_or_dict)
    else:
        with open(path_or_dict) as f:
            config = json.load(f)
    check_config(config)
    kind = config["model"]["type"]
    config = merge(_DEFAULTS_BY_TYPE[kind], config)
    if kind == "image_transformer_v1" and not config["model"]["d_ff"]:
        config["model"]["d_ff"] = round_to_power_of_two(config["model"]["width"] * 8 / 3, tol=0.05)
    elif kind == "image_transformer_v2":
        _fill_v2(config["model"])
    return merge(DEFAULTS, config)
