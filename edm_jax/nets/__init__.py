"""Flax networks of NVlabs/edm (DDPM++, NCSN++, ADM), preconditioned models and conversion."""

from edm_jax.nets.convert import (
    from_state_dict,
    load_reference,
    load_reference_npz,
    model_from_reference_config,
    to_state_dict,
)
from edm_jax.nets.dhariwal_unet import DhariwalUNet
from edm_jax.nets.model import DiffusionModel, count_params, trainable_mask
from edm_jax.nets.presets import ARCHITECTURES, PRESETS, build_model
from edm_jax.nets.song_unet import SongUNet

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "DhariwalUNet",
    "DiffusionModel",
    "SongUNet",
    "build_model",
    "count_params",
    "from_state_dict",
    "load_reference",
    "load_reference_npz",
    "model_from_reference_config",
    "to_state_dict",
    "trainable_mask",
]
