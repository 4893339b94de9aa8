"""Training recipes shared by several configs/*.py (so no config loads a sibling file)."""

from __future__ import annotations

import ml_collections

from edm_jax.nets.presets import EDM2_TRAINING
from edm_jax.train.config_io import default_config, parse_variant

__all__ = ["ARCHS_64", "EDM2_SIZES", "edm2", "edm_64x64"]

ARCHS_64 = {"ddpmpp": "ddpmpp_64", "ncsnpp": "ncsnpp_64"}


def edm_64x64(arg: str | None, *, path: str, dropout: float) -> ml_collections.ConfigDict:
    """EDM's unconditional 64x64 recipe (Table 7: FFHQ, AFHQv2); variant 'arch=ddpmpp|ncsnpp'.

    Batch 256, lr 2e-4 with a 10 Mimg ramp-up, EMA half-life 0.5 Mimg, 200 Mimg, augment 0.15.
    """
    v = parse_variant(arg, arch=tuple(ARCHS_64))
    c = default_config()
    c.data.update(name="zip", path=path, resolution=64, channels=3, use_labels=False,
                  num_workers=4)  # fmt: skip
    c.model.arch = ARCHS_64[v.arch]
    c.model.net.dropout = dropout
    c.optim.update(lr=2e-4, lr_rampup_kimg=10000.0)
    c.ema.update(halflife_kimg=500.0, rampup_ratio=0.05)
    c.train.update(batch_size=256, total_kimg=200000.0, augment_p=0.15)
    c.log.update(log_every_steps=100, checkpoint_every_steps=5000, keep_period_steps=50000,
                 sample_every_kimg=5000.0, sample_grid=8, sample_steps=40)  # fmt: skip
    return c


EDM2_SIZES = {  # the default size first
    "img64": ("s", "xs", "m", "l", "xl"),
    "img512": ("s", "xxs", "xs", "m", "l", "xl", "xxl"),
}


def edm2(arg: str | None, *, dataset: str) -> ml_collections.ConfigDict:
    """NVlabs/edm2 train_edm2.py's recipe for edm2-<dataset>-<size>; variant 'size=...'.

    EDM2 loss with learned uncertainty, Adam 0.9/0.99 with lr = ref_lr / sqrt(max(t /
    ref_batches, 1)) and a 10 Mimg ramp-up, batch 2048, power-function EMAs (std 0.050,
    0.100) snapshotted every 8 Mi images for post-hoc EMA. The data section is the caller's.
    """
    v = parse_variant(arg, size=EDM2_SIZES[dataset])
    name = f"edm2-{dataset}-{v.size}"
    t = EDM2_TRAINING[name]
    c = default_config()
    c.model.update(arch=name, dtype="bfloat16")  # the reference trains in fp16 on GPUs
    c.loss.name = "edm2"
    c.loss.kwargs.update(dict(P_mean=t["P_mean"], P_std=t["P_std"]))
    c.optim.update(lr=t["ref_lr"], lr_rampup_kimg=10000.0, b1=0.9, b2=0.99, eps=1e-8,
                   schedule="edm2", ref_batches=float(t["ref_batches"]))  # fmt: skip
    c.ema.update(power_stds=(0.05, 0.10))
    c.ema.snapshot_every_kimg = (8 << 20) / 1000  # 8 Mi images
    c.ema.snapshot_dtype = "float16"
    c.train.update(batch_size=2048, total_kimg=t["duration_mimg"] * (1 << 20) / 1000,
                   augment_p=0.0)  # fmt: skip
    c.log.update(log_every_steps=100, checkpoint_every_steps=5000, keep_period_steps=50000,
                 sample_every_kimg=50000.0, sample_grid=10, sample_steps=32)  # fmt: skip
    return c
