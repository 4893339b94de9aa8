"""Training configs: the default ConfigDict, loading from .py / .yaml / .json, validation.

A config is an ``ml_collections.ConfigDict`` with the sections of ``default_config()``.
``configs/<x>.py`` files start from ``default_config()`` and change what they need;
a ``.yaml`` or ``.json`` file holds the same keys (any subset) and is merged onto it.
``validate`` checks every value that would otherwise fail late (inside XLA compilation
or after minutes of data loading) and raises ValueError naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_flags import config_flags

__all__ = ["default_config", "define_config_flag", "load_config", "merge_mapping", "to_json"]


def _section(**kw: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may hold, with EDM's CIFAR-10 values as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = _section(
        name="digits", resolution=8, channels=1, use_labels=False, path="", tfds_name="",
        tfds_data_dir="", split="train", cache=False, num_workers=0,
    )  # fmt: skip
    c.model = _section(
        arch="ddpmpp", precond="edm", dtype="float32", self_cond=False, patch_size=1,
        img_resolution=0,  # 0: data.resolution
        net=ml_collections.ConfigDict(),  # network field overrides (model_channels, ...)
        precond_kwargs=ml_collections.ConfigDict(),
    )  # fmt: skip
    c.loss = _section(name="edm", kwargs=ml_collections.ConfigDict())
    c.optim = _section(lr=1e-3, lr_rampup_kimg=10000.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0)
    c.optim.schedule = "edm"  # 'edm2': lr / sqrt(max(nimg / (ref_batches batch), 1)) (EDM2)
    c.optim.ref_batches = 70000.0
    # EDM: half-life in kimg with ramp-up (None-like: rampup_ratio=0); EDM2: power-EMA stds.
    c.ema = _section(halflife_kimg=500.0, rampup_ratio=0.05, power_stds=())
    c.ema.snapshot_every_kimg = 0.0  # EDM2 post-hoc EMA: write power EMAs (0: never)
    c.ema.snapshot_dtype = "float16"  # as NVlabs/edm2's snapshots
    c.train = _section(
        batch_size=512, total_kimg=200000.0, grad_accum=1, augment_p=0.0, self_cond_prob=0.5,
        remat="none", fsdp=False, fsdp_min_size=2**18,
    )  # fmt: skip
    c.log = _section(
        log_every_steps=100, checkpoint_every_steps=1000, keep_checkpoints=3,
        keep_period_steps=0, sample_every_kimg=0.0, sample_grid=8, sample_steps=18,
        sample_seed=0, tqdm=True, tensorboard=True,
    )  # fmt: skip
    return c


def merge_mapping(
    config: ml_collections.ConfigDict, values: Mapping, prefix: str = ""
) -> ml_collections.ConfigDict:
    """Set config keys from a nested mapping; unknown keys raise ValueError naming them."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in config:
            raise ValueError(f"unknown config key {name!r}; valid: {sorted(config.keys())}")
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, Mapping):
            if not current.keys():  # open sections (net overrides, loss kwargs): take as is
                config[key] = ml_collections.ConfigDict(
                    {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            else:
                merge_mapping(current, value, prefix=f"{name}.")
        else:
            config[key] = tuple(value) if isinstance(value, list) else value
    return config


def _read_mapping(path: Path) -> Mapping:
    """Parse a .json or .yaml file into a mapping."""
    text = path.read_text()
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return values


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Config from 'x.py[:arg]' (its get_config(arg)), 'x.yaml' / 'x.yml' or 'x.json'."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path_str!r} not found")
    if path.suffix in (".json", ".yaml", ".yml"):
        return merge_mapping(default_config(), _read_mapping(path))
    if path.suffix != ".py":
        raise ValueError(f"config {spec!r}: expected a .py, .yaml, .yml or .json file")
    module_spec = importlib.util.spec_from_file_location(f"_edm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


class _AnyConfigParser(config_flags.ConfigFileFlagParser):
    """config_flags' file parser that also reads .yaml/.json files holding the same keys."""

    def parse(self, path):
        """Load path (.py[:arg] through ml_collections; .yaml/.json merged on the defaults)."""
        if isinstance(path, str) and os.path.splitext(path)[1] in (".json", ".yaml", ".yml"):
            config = load_config(path)
            if self._lock_config:
                config.lock()
            return config
        return super().parse(path)


def define_config_flag(name: str = "config", default: str | None = None):
    """An absl flag like config_flags.DEFINE_config_file, also taking .yaml/.json files."""
    from absl import flags

    flag = config_flags._ConfigFlag(  # noqa: SLF001 - the only way to swap the file parser
        parser=_AnyConfigParser(name=name, lock_config=True),
        serializer=flags.ArgumentSerializer(),
        name=name,
        default=default,
        help_string="training config: configs/x.py[:variant], or a .yaml/.json file",
        flag_values=flags.FLAGS,
    )
    return flags.DEFINE_flag(flag, flags.FLAGS)


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
