"""FFHQ 64x64 (EDM, Table 7): DDPM++ with channel_mult 1,2,2,2, lr 2e-4, dropout 0.05, augment 0.15.

Point data.path at an NVlabs/edm dataset zip or an image folder:
``--config configs/ffhq64.py --config.data.path=datasets/ffhq-64x64.zip``. Variant ':arch=ncsnpp'.
"""

from edm_jax.train.config_io import default_config

ARCHS = {"ddpmpp": "ddpmpp_64", "ncsnpp": "ncsnpp_64"}


def get_config(arg=None, dropout=0.05):
    """EDM's 64x64 recipe: batch 256, lr 2e-4, EMA 0.5 Mimg, 200 Mimg, unconditional."""
    arch = (arg or "arch=ddpmpp").partition("=")[2] or "ddpmpp"
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    c = default_config()
    c.data.update(name="zip", path="datasets/ffhq-64x64.zip", resolution=64, channels=3,
                  use_labels=False, num_workers=4)  # fmt: skip
    c.model.arch = ARCHS[arch]
    c.model.net.dropout = dropout
    c.optim.update(lr=2e-4, lr_rampup_kimg=10000.0)
    c.ema.update(halflife_kimg=500.0, rampup_ratio=0.05)
    c.train.update(batch_size=256, total_kimg=200000.0, augment_p=0.15)
    c.log.update(log_every_steps=100, checkpoint_every_steps=5000, keep_period_steps=50000,
                 sample_every_kimg=5000.0, sample_grid=8, sample_steps=40)  # fmt: skip
    return c
