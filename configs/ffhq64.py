"""FFHQ 64x64 (EDM, Table 7): DDPM++ with channel_mult 1,2,2,2, lr 2e-4, dropout 0.05, augment 0.15.

Point data.path at an NVlabs/edm dataset zip or an image folder:
``--config configs/ffhq64.py --config.data.path=datasets/ffhq-64x64.zip``. Variant ':arch=ncsnpp'.
"""

from edm_jax.train.recipes import edm_64x64


def get_config(arg=None):
    """EDM's 64x64 recipe: batch 256, lr 2e-4, EMA 0.5 Mimg, 200 Mimg, unconditional."""
    return edm_64x64(arg, path="datasets/ffhq-64x64.zip", dropout=0.05)
