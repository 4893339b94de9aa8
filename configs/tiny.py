"""A seconds-long config for tests: class-conditional EDM on 8x8 digits with a tiny DDPM++."""

from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """Tiny run; variant 'cond=0' drops the labels."""
    v = parse_variant(arg, cond=True)
    c = default_config()
    c.data.update(name="digits", resolution=8, channels=1, use_labels=v.cond)
    c.model.arch = "ddpmpp"
    c.model.net.update(
        dict(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0)
    )
    c.optim.update(lr=1e-3, lr_rampup_kimg=0.05)
    c.ema.update(halflife_kimg=0.05, rampup_ratio=0.05)
    c.train.update(batch_size=16, total_kimg=0.128)  # 8 steps
    c.log.update(log_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=3,
                 sample_every_kimg=0.0, sample_grid=2, sample_steps=4, tqdm=False,
                 tensorboard=False)  # fmt: skip
    return c
