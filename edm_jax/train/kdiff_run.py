"""A k-diffusion JSON config as a training config: ``train.py --config config_mnist.json``.

``config_io.load_config`` tells a k-diffusion file (its ``model`` section has a ``type``)
from our own JSON configs and hands it to ``to_train_config(values, default_config())``, which fills k-diffusion's defaults
(``kdiff_config.load_config``) and returns the ``default_config()`` ConfigDict that trains
it the way k-diffusion's train.py does: the network (``model.arch='kdiffusion'``, the loaded
config in ``model.kdiff_config``), its Denoiser loss (weighting, sigma_data, the sample
density drawn stratified over the batch), AdamW with its parameter groups and lr schedule,
``clip_grad_norm_(1.0)``, the EMA warmup, class dropout, and Karras augmentation with the
config's ``augment_prob``. train.py's command-line defaults: batch 64, a demo grid every 500
steps, a checkpoint every 10000; no end step (k-diffusion trains until stopped, so the
default duration is long: stop with Ctrl-C, rerun to resume, or set
``--config.train.total_kimg``).

Datasets: ``imagefolder`` / ``imagefolder-class`` (data.name 'folder'), ``cifar10`` and
``mnist`` (tfds, ``location`` as its data_dir), and edm_jax's offline ``digits``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from edm_jax.checks import check_choice
from edm_jax.nets import kdiff_config
from edm_jax.nets.spec import KDIFF_ARCH
from edm_jax.train import kdiff_recipe

__all__ = ["DATASET_TYPES", "check_growth", "grown_params", "to_train_config"]

DATASET_TYPES = ("imagefolder", "imagefolder-class", "cifar10", "mnist", "digits")
UNSUPPORTED_DATASETS = ("huggingface", "wds", "wds-class", "custom")
BATCH_SIZE, DEMO_EVERY, SAVE_EVERY = 64, 500, 10000  # k-diffusion train.py's defaults


def _data(dataset: dict, model: dict, given: Mapping) -> dict:
    """The data section for k-diffusion's dataset section (one clear error if unsupported,
    naming the fields ``given`` in the file)."""
    kind = dataset["type"]
    if kind in UNSUPPORTED_DATASETS:
        fields = {k: v for k, v in given.items() if k != "type"}
        raise ValueError(
            f"k-diffusion dataset type {kind!r} ({fields}) is not supported; valid: "
            f"{', '.join(DATASET_TYPES)} (convert it to an image folder)"
        )
    check_choice("k-diffusion dataset type", kind, DATASET_TYPES)
    h, w = model["input_size"]
    if h != w:
        raise ValueError(f"model.input_size {model['input_size']} must be square for training")
    num_classes = int(dataset.get("num_classes", 0))
    data = {"resolution": int(h), "channels": int(model["input_channels"]),
            "use_labels": num_classes > 0 or kind == "imagefolder-class"}  # fmt: skip
    if kind.startswith("imagefolder"):
        return {**data, "name": "folder", "path": str(dataset.get("location", ""))}
    if kind in ("cifar10", "mnist"):
        return {**data, "name": "tfds", "tfds_name": kind,
                "tfds_data_dir": str(dataset.get("location", ""))}  # fmt: skip
    return {**data, "name": "digits"}


def _check_loss(model: dict) -> None:
    """The Denoiser losses trained here (karras config, no variance head, loss_scales 1)."""
    if model["loss_config"] != "karras" or model["has_variance"] or model["loss_scales"] != 1:
        raise ValueError(
            "training supports k-diffusion's 'karras' Denoiser loss with has_variance false and "
            f"loss_scales 1; got loss_config={model['loss_config']!r}, "
            f"has_variance={model['has_variance']}, loss_scales={model['loss_scales']}"
        )


def to_train_config(values: Mapping, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base`` (config_io.default_config()) set to train a k-diffusion config file's contents."""
    kconfig = kdiff_config.load_config(dict(values))
    model = kconfig["model"]
    _check_loss(model)
    kdiff_recipe.check_recipe(kconfig)
    density, options = kdiff_recipe.sample_density(model)
    c = base
    c.data.update(_data(kconfig["dataset"], model, values.get("dataset") or {}))
    c.model.arch = KDIFF_ARCH
    c.model.kdiff_config = json.dumps(kconfig, sort_keys=True)
    c.loss.update(density=density, weighting=model["loss_weighting"])
    c.loss.kwargs = ml_collections.ConfigDict(
        {**options, "sigma_data": model["sigma_data"], "stratified": True}
    )
    c.optim.update(schedule="kdiffusion", lr=kconfig["optimizer"]["lr"], grad_clip=1.0)
    c.train.update(batch_size=BATCH_SIZE, augment_p=float(model["augment_prob"]))
    steps_kimg = BATCH_SIZE / 1000
    c.log.update(log_every_steps=25, checkpoint_every_steps=SAVE_EVERY,
                 sample_every_kimg=DEMO_EVERY * steps_kimg, sample_grid=8, sample_steps=50)  # fmt: skip
    return c


def check_growth(grow_from: str, model: Any) -> None:
    """One clear error, before any compute, unless ``grow_from`` holds a committed k-diffusion
    image_v1 run and ``model`` is an image_v1 network too."""
    from edm_jax.checkpoint_reader import (
        SPEC_ITEM,
        committed_steps,
        locate_checkpoint,
        read_json_item,
    )

    directory, step = locate_checkpoint(grow_from)
    steps = [step] if step is not None else committed_steps(directory)
    if not steps:
        raise ValueError(f"--grow-from {grow_from}: no committed checkpoint there yet")
    try:
        old = read_json_item(directory / str(steps[-1]), SPEC_ITEM).get("config")
    except OSError:
        old = None
    kinds = [c["model"]["type"] if isinstance(c, dict) else "not a k-diffusion network"
             for c in (old, getattr(model, "config", None))]  # fmt: skip
    if kinds != ["image_v1", "image_v1"]:
        raise ValueError(
            f"--grow-from {grow_from}: growing needs two k-diffusion image_v1 networks; the run "
            f"there is {kinds[0]}, this config's is {kinds[1]}"
        )


def grown_params(grow_from: str, model: Any, rng: Any) -> Any:
    """Progressive growing: the EMA parameters of the image_v1 run in ``grow_from`` carried into
    ``model`` (fewer skip_stages or a smaller patch size; new proj_in, zero proj_out), as
    k-diffusion's set_skip_stages / set_patch_size (``check_growth`` first)."""
    from edm_jax.checkpoint_reader import load_checkpoint
    from edm_jax.nets.kdiff_image_v1 import grow_params

    _, ema, _ = load_checkpoint(grow_from)
    try:
        return grow_params(ema, model.net, rng)
    except ValueError as e:
        raise ValueError(f"--grow-from {grow_from}: {e}") from None
