"""EDM2 on ImageNet 64x64 pixels (Karras et al. 2024, train_edm2.py edm2-img64-* presets).

Magnitude-preserving U-Net, EDM2 loss (P_mean -0.8, P_std 1.6) with learned uncertainty, the
inverse-square-root learning rate (ref_batches 35000) and post-hoc EMA snapshots
(``edm_jax.train.recipes.edm2``). Point data.path at an NVlabs dataset zip
(``--config.data.path=...``).
"""

from edm_jax.train.recipes import edm2


def get_config(arg=None):
    """Variant: 'size=xs' | 's' (default) | 'm' | 'l' | 'xl' (the edm2-img64-* presets)."""
    c = edm2(arg, dataset="img64")
    c.data.update(name="zip", path="datasets/imagenet-64x64.zip", resolution=64, channels=3,
                  use_labels=True, num_workers=8)  # fmt: skip
    return c
