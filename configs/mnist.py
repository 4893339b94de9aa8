"""MNIST 28x28 from tfds, class-conditional EDM with a small DDPM++ (about an hour on one GPU)."""

from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """Small DDPM++ (64 channels, 28 -> 14 -> 7); variant 'cond=0' drops the labels."""
    v = parse_variant(arg, cond=True)
    c = default_config()
    c.data.update(name="tfds", tfds_name="mnist", resolution=28, channels=1,
                  use_labels=v.cond)  # fmt: skip
    c.model.arch = "ddpmpp"
    c.model.net.update(
        dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7,),
             dropout=0.1)
    )  # fmt: skip
    c.optim.update(lr=1e-3, lr_rampup_kimg=200.0)
    c.ema.update(halflife_kimg=50.0, rampup_ratio=0.05)
    c.train.update(batch_size=256, total_kimg=10000.0)
    c.log.update(log_every_steps=100, checkpoint_every_steps=2000, sample_every_kimg=500.0,
                 sample_grid=10, sample_steps=18)  # fmt: skip
    return c
