"""CIFAR-10 32x32, EDM config F (Karras et al. 2022, Table 7): DDPM++ or NCSN++, 200 Mimg.

Variants: 'cifar10.py' (conditional DDPM++), 'cifar10.py:arch=ncsnpp',
'cifar10.py:cond=0' (unconditional); several joined by commas ('arch=ncsnpp,cond=0').
"""

from edm_jax.train.config_io import default_config, parse_variant

ARCHS = {"ddpmpp": "ddpmpp_cifar10", "ncsnpp": "ncsnpp_cifar10"}


def get_config(arg=None):
    """EDM's CIFAR-10 recipe: batch 512, lr 1e-3 (10 Mimg ramp-up), EMA 0.5 Mimg, augment 0.12."""
    v = parse_variant(arg, arch=tuple(ARCHS), cond=True)
    c = default_config()
    c.data.update(name="tfds", tfds_name="cifar10", resolution=32, channels=3,
                  use_labels=v.cond, num_workers=0)  # fmt: skip
    c.model.arch = ARCHS[v.arch]
    c.model.net.dropout = 0.13
    c.optim.update(lr=1e-3, lr_rampup_kimg=10000.0)
    c.ema.update(halflife_kimg=500.0, rampup_ratio=0.05)
    c.train.update(batch_size=512, total_kimg=200000.0, augment_p=0.12)
    c.log.update(log_every_steps=100, checkpoint_every_steps=5000, keep_period_steps=50000,
                 sample_every_kimg=5000.0, sample_grid=10, sample_steps=18)  # fmt: skip
    return c
