"""EDM2 on ImageNet 64x64 pixels (Karras et al. 2024, train_edm2.py edm2-img64-* presets).

Magnitude-preserving U-Net, EDM2 loss (P_mean -0.8, P_std 1.6) with learned uncertainty,
Adam 0.9/0.99 with lr = ref_lr / sqrt(max(t / 35000, 1)) and a 10 Mimg ramp-up, batch 2048,
power-function EMAs (std 0.050, 0.100) snapshotted every 8 Mi images for post-hoc EMA.
Point data.path at an NVlabs dataset zip (``--config.data.path=...``).
"""

from edm_jax.nets.presets import EDM2_TRAINING
from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """Variant: 'size=xs' | 's' (default) | 'm' | 'l' | 'xl' (the edm2-img64-* presets)."""
    v = parse_variant(arg, size=("s", "xs", "m", "l", "xl"))
    name = f"edm2-img64-{v.size}"
    t = EDM2_TRAINING[name]
    c = default_config()
    c.data.update(name="zip", path="datasets/imagenet-64x64.zip", resolution=64, channels=3,
                  use_labels=True, num_workers=8)  # fmt: skip
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
