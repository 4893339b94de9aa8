"""Check a training config against the data, the devices and the registries before compiling.

Every error is a ValueError that names the config key, the bad value and the valid ones.
"""

from __future__ import annotations

import math

import ml_collections

from edm_jax import losses
from edm_jax.checks import MAX_SEED, did_you_mean
from edm_jax.data.load import SOURCES
from edm_jax.nets.presets import (
    ARCHITECTURES,
    DTYPES,
    PRESETS,
    net_fields,
    resolve_arch,
)
from edm_jax.nets.spec import KDIFF_ARCH
from edm_jax.precond import PRECONDS
from edm_jax.schedules import DENSITIES
from edm_jax.train.evaluate import check_eval_config

__all__ = ["REMAT", "validate_config", "validate_data"]

REMAT = ("none", "dots", "full")


def _choice(key: str, value, valid) -> None:
    """Raise ValueError naming key unless value is one of valid."""
    if value not in valid:
        hint = did_you_mean(value, valid) if isinstance(value, str) else ""
        raise ValueError(f"config.{key}={value!r} is not valid{hint}; valid: {sorted(valid)}")


def _positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    """Raise ValueError naming the first key whose value is not > 0 (or >= 0)."""
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
        if not ok or isinstance(value, bool):
            sign = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"config.{key} must be a number {sign}, got {value!r}")


def _check_loss(loss: ml_collections.ConfigDict) -> None:
    """The loss preset, its sigma density, weighting and options exist (losses.from_config)."""
    _choice("loss.name", loss.name, [*losses.PRESETS, "edm2"])
    if loss.name == "edm2":  # EDM2Loss: the network's logvar head gives the uncertainty
        try:
            losses.check_edm2_options(dict(loss.kwargs), loss.density, loss.weighting)
        except ValueError as e:
            raise ValueError(f"config.loss: {e}") from None
        return
    if loss.density:
        _choice("loss.density", loss.density, DENSITIES)
    if loss.weighting:
        _choice("loss.weighting", loss.weighting, losses.WEIGHTINGS)
    try:
        losses.from_config(loss.to_dict())
    except ValueError as e:
        raise ValueError(f"config.loss.kwargs: {e}") from None


def _check_net(config: ml_collections.ConfigDict) -> None:
    """Architecture, network overrides, precond, dtype, loss and its options exist."""
    _choice("model.arch", config.model.arch, [*PRESETS, *ARCHITECTURES, KDIFF_ARCH])
    _choice("optim.schedule", config.optim.schedule, ["edm", "edm2", "kdiffusion"])
    if (config.model.arch == KDIFF_ARCH) != (config.optim.schedule == "kdiffusion"):
        raise ValueError(
            f"config.model.arch={config.model.arch!r} with optim.schedule="
            f"{config.optim.schedule!r}: a k-diffusion network (from a k-diffusion JSON config) "
            "trains with its own recipe, schedule 'kdiffusion', and only it does"
        )
    if config.model.arch != KDIFF_ARCH:
        net_cls, _ = resolve_arch(config.model.arch)
        for key in config.model.net.keys():
            _choice(f"model.net.{key}", key, net_fields(net_cls))
    _choice("model.precond", config.model.precond, PRECONDS)
    _choice("model.dtype", config.model.dtype, DTYPES)
    _check_loss(config.loss)
    _choice("train.remat", config.train.remat, REMAT)
    _choice("data.name", config.data.name, SOURCES)


def _finite(config: ml_collections.ConfigDict, *keys: str) -> None:
    """Raise ValueError naming the first key whose value is not a finite number."""
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"config.{key} must be a finite number > 0, got {value!r}")


def _check_seed(seed) -> None:
    """config.seed is an int in [0, 2**32) (the data order and the initial weights use it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"config.seed must be an int in [0, 2**32), got {seed!r}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Check names, numbers and the batch split over devices; no data is read."""
    _check_net(config)
    _check_seed(config.seed)
    _finite(config, "train.total_kimg", "optim.lr_rampup_kimg", "ema.halflife_kimg")
    _finite(config, "log.sample_every_kimg")
    _positive(config, "train.batch_size", "train.grad_accum", "train.total_kimg", "optim.lr")
    _positive(config, "log.log_every_steps", "log.checkpoint_every_steps", "log.sample_grid")
    _positive(config, "log.keep_checkpoints", "log.sample_steps")
    _positive(
        config, "optim.lr_rampup_kimg", "ema.halflife_kimg", "ema.rampup_ratio", allow_zero=True
    )
    _positive(config, "train.augment_p", "log.sample_every_kimg", allow_zero=True)
    _finite(config, "ema.snapshot_every_kimg")
    _positive(config, "ema.snapshot_every_kimg", allow_zero=True)
    if config.train.augment_p > 1:
        raise ValueError(f"config.train.augment_p must be in [0, 1], got {config.train.augment_p}")
    for std in config.ema.power_stds:
        if not 0 < std < 0.289:  # the profile std of exponent gamma -> 0 is 1/sqrt(12)
            raise ValueError(f"config.ema.power_stds entries must be in (0, 0.289), got {std}")
    b, a = config.train.batch_size, config.train.grad_accum
    if b % (a * num_devices):
        raise ValueError(
            f"config.train.batch_size={b} must be divisible by train.grad_accum={a} x "
            f"{num_devices} devices (each device takes an equal part of each micro-batch)"
        )
    if config.train.gns and a < 2:
        raise ValueError(
            "config.train.gns (--gns) needs train.grad_accum >= 2: the gradient noise scale "
            f"compares the micro-batch gradients with their mean; got grad_accum={a}"
        )
    if config.log.checkpoint_every_steps % config.log.log_every_steps:
        raise ValueError(
            f"config.log.checkpoint_every_steps={config.log.checkpoint_every_steps} must be "
            f"a multiple of log.log_every_steps={config.log.log_every_steps} "
            "(losses are checked for non-finite values before every save)"
        )
    check_eval_config(config)  # eval.*: metrics, weight and reference files


def _check_latent(config: ml_collections.ConfigDict, source) -> None:
    """A latent dataset needs data.encoder (and the reverse); no augmentation of latents."""
    encoder = config.data.get("encoder", "")
    latent = bool(getattr(source, "is_latent", False))
    if latent and not encoder:
        raise ValueError(
            f"data.name={config.data.name!r} holds VAE latents but config.data.encoder is empty: "
            "set data.encoder (e.g. 'sd-vae-ft-mse') and data.encoder_weights to train a latent model"
        )
    if encoder and not latent:
        raise ValueError(
            f"config.data.encoder={encoder!r} makes a latent model, but data.name="
            f"{config.data.name!r} is pixel data: encode it first (python -m edm_jax.data.tool "
            "--encoder ...) and use data.name='latents', or set data.encoder=''"
        )
    if encoder and not config.data.get("encoder_weights", ""):
        raise ValueError(
            f"config.data.encoder={encoder!r} needs config.data.encoder_weights (.npz)"
        )
    if encoder and config.train.augment_p > 0:
        raise ValueError("config.train.augment_p must be 0 for latent models (pixel augmentation)")


def validate_data(config: ml_collections.ConfigDict, source) -> None:
    """The model resolution/channels match the data and the U-Net levels divide it."""
    _check_latent(config, source)
    res, want = source.resolution, config.data.resolution
    if res != want:
        raise ValueError(f"config.data.resolution={want} but the data source is {res}x{res}")
    if source.channels != config.data.channels:
        raise ValueError(
            f"config.data.channels={config.data.channels} but the data has {source.channels}"
        )
    if config.model.img_resolution not in (0, res):
        raise ValueError(
            f"config.model.img_resolution={config.model.img_resolution} does not match the "
            f"data resolution {res} (config.data.resolution); set it to 0 or {res}"
        )
    if config.data.use_labels and not source.num_classes:
        raise ValueError("config.data.use_labels=True but the data source has no labels")
    if config.model.arch == KDIFF_ARCH:
        return  # the k-diffusion config's input_size is data.resolution (kdiff_run)
    net_cls, fields = resolve_arch(config.model.arch)
    mult = tuple(config.model.net.get("channel_mult", fields.get("channel_mult", (1,))))
    r = res // config.model.patch_size
    if r % (1 << (len(mult) - 1)) or res % config.model.patch_size:
        raise ValueError(
            f"config.data.resolution={res} (patch_size {config.model.patch_size}) is not "
            f"divisible by 2^{len(mult) - 1} for config.model.net.channel_mult={mult}"
        )


def check_numbers_and_platform(config: ml_collections.ConfigDict, devices) -> None:
    """Learning rate finite and > 0; model.dtype float16 only on accelerators."""
    import math

    lr = config.optim.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"config.optim.lr must be a finite number > 0, got {lr!r}")
    platforms = sorted({d.platform for d in devices})
    if config.model.dtype == "float16" and platforms == ["cpu"]:
        raise ValueError(
            "config.model.dtype='float16' is not supported on the CPU (XLA's CPU float16 "
            "convolutions are slow and overflow-prone); use 'float32' or 'bfloat16'"
        )
