"""Model specs: the one place a training config becomes a model, and a spec becomes a model.

A spec is the JSON that ``build_model`` needs (architecture, preconditioning, resolution,
channels, labels, network fields, latent encoder, class names). Training writes it with each
checkpoint (``spec_from_config``); readers build the model from it (``model_from_spec``)
without the training stack. ``build_model_from_config`` is the two in one step.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from edm_jax.nets.model import DiffusionModel, LatentEncoder
from edm_jax.nets.presets import build_model, net_fields, resolve_arch

__all__ = [
    "KDIFF_ARCH",
    "build_model_from_config",
    "model_from_spec",
    "resolved_spec",
    "spec_from_config",
]


KDIFF_ARCH = "kdiffusion"  # model.arch of a k-diffusion JSON config (model.kdiff_config)


def spec_from_config(config: Any, source: Any) -> dict:
    """Everything build_model needs (JSON) for config.model on this data source.

    A k-diffusion network's spec is its loaded k-diffusion config, as its checkpoints carry it.
    """
    if config.model.arch == KDIFF_ARCH:
        return {"version": 1, "arch": KDIFF_ARCH, "config": json.loads(config.model.kdiff_config)}
    from edm_jax.data.augment import augment_dim  # the data package (grain): training only

    _, fields = resolve_arch(config.model.arch)
    net = {**fields, **config.model.net.to_dict()}
    return json.loads(json.dumps({
        "version": 1, "arch": config.model.arch, "precond": config.model.precond,
        "precond_kwargs": config.model.precond_kwargs.to_dict(),
        "img_resolution": source.resolution, "img_channels": source.channels,
        "label_dim": source.num_classes if config.data.use_labels else 0,
        "augment_dim": augment_dim() if config.train.augment_p > 0 else 0,
        "dtype": config.model.dtype, "self_cond": bool(config.model.self_cond),
        "patch_size": config.model.patch_size, "net": net,
        "encoder": [config.data.encoder, config.data.encoder_weights]
        if config.data.get("encoder", "") else None,
        **({"class_names": list(source.class_names)}
           if config.data.use_labels and getattr(source, "class_names", None) else {}),
    }))  # fmt: skip


def model_from_spec(spec: dict) -> Any:
    """The DiffusionModel (or KDiffusionModel) described by a spec (a checkpoint's model_spec)."""
    if spec.get("arch") == KDIFF_ARCH:
        from edm_jax.nets.kdiff_models import from_config

        return from_config(spec["config"])
    spec = dict(spec)
    net = spec.pop("net")
    spec.pop("version", None)
    arch = spec.pop("arch")
    encoder = spec.pop("encoder", None)  # latent models: [VAE preset or config, weights]
    names = tuple(spec.pop("class_names", None) or ())  # folder datasets: class names
    model = build_model(arch, **spec, **net)
    model = dataclasses.replace(model, class_names=names) if names else model
    return dataclasses.replace(model, encoder=LatentEncoder(*encoder)) if encoder else model


def build_model_from_config(config: Any, source: Any) -> DiffusionModel:
    """The DiffusionModel of config.model for this data source (labels, augment labels)."""
    return model_from_spec(spec_from_config(config, source))


def resolved_spec(spec: dict) -> dict:
    """A model spec with every settable field of its network filled (defaults included)."""
    if spec.get("arch") == KDIFF_ARCH:  # its config is already filled (load_config)
        return spec
    net_cls, preset = resolve_arch(spec["arch"])
    settable = set(net_fields(net_cls))
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(net_cls)
        if f.name in settable and f.default is not dataclasses.MISSING
    }
    net = json.loads(json.dumps({**defaults, **preset, **spec["net"]}, default=str))
    return {**spec, "net": net}
