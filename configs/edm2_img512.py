"""EDM2 on ImageNet 512x512 as 64x64x4 SD-VAE latents (train_edm2.py edm2-img512-* presets).

Magnitude-preserving U-Net, EDM2 loss (P_mean -0.4, P_std 1.0) with learned uncertainty, the
inverse-square-root learning rate (ref_batches 70000) and post-hoc EMA snapshots
(``edm_jax.train.recipes.edm2``). The data are VAE latents written by the dataset tool
(``python -m edm_jax.data.tool --transform center-crop-dhariwal --resolution 512 --encoder
sd-vae-ft-mse --encoder-weights vae.npz``); point data.path and data.encoder_weights at them.
"""

from edm_jax.train.recipes import edm2


def get_config(arg=None):
    """Variant: 'size=xxs' | 'xs' | 's' (default) | 'm' | 'l' | 'xl' | 'xxl' (edm2-img512-*)."""
    c = edm2(arg, dataset="img512")
    c.data.update(name="latents", path="datasets/img512-sd-latents", resolution=64, channels=4,
                  use_labels=True, num_workers=8, encoder="sd-vae-ft-mse",
                  encoder_weights="weights/sd-vae-ft-mse.npz")  # fmt: skip
    return c
