"""EDM2 on scikit-learn's 8x8 digits, class-conditional, minutes on a CPU (offline).

A tiny magnitude-preserving U-Net (two levels, no attention), the EDM2 loss with the learned
uncertainty, forced weight normalisation, Adam 0.9/0.99 with the inverse-sqrt schedule and
power-function EMAs written as post-hoc EMA snapshots (``python -m edm_jax.train.phema``).
"""

from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """Variant: 'cond=0' for unconditional training."""
    v = parse_variant(arg, cond=True)
    c = default_config()
    c.data.update(name="digits", resolution=8, channels=1, use_labels=v.cond)
    c.model.arch = "edm2"
    c.model.net.update(
        dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
    )
    c.loss.name = "edm2"
    c.loss.kwargs.update(dict(P_mean=-0.8, P_std=1.6))  # EDM2's pixel-space (img64) values
    c.optim.update(lr=0.01, lr_rampup_kimg=2.0, b1=0.9, b2=0.99, schedule="edm2", ref_batches=200)
    c.ema.update(halflife_kimg=5.0, rampup_ratio=0.05, power_stds=(0.05, 0.10))
    c.ema.snapshot_every_kimg = 10.0
    c.ema.snapshot_dtype = "float32"
    c.train.update(batch_size=128, total_kimg=60.0)
    c.log.update(log_every_steps=10, checkpoint_every_steps=100, keep_checkpoints=2,
                 sample_every_kimg=20.0, sample_grid=10, sample_steps=18)  # fmt: skip
    return c
