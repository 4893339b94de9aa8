"""Training recipes shared by several configs/*.py (so no config loads a sibling file)."""

from __future__ import annotations

import ml_collections

from edm_jax.train.config_io import default_config, parse_variant

__all__ = ["ARCHS_64", "edm_64x64"]

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
