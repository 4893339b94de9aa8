"""The default main job: class-conditional EDM on scikit-learn's 8x8 digits, minutes on a CPU.

Offline (the digits ship with scikit-learn), a small DDPM++ U-Net (two levels, 8x8 and
4x4, no attention), EDM preconditioning and loss, Adam with a short lr ramp-up and a
short EMA. ``benchmarks/eval_digits.py`` checks the samples with a digit classifier.
"""

from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """Variants: 'cond=0' for unconditional training, 'cfg' for label dropout 0.1 (guidance)."""
    v = parse_variant(arg, cond=True, cfg=False)
    if v.cfg and not v.cond:
        raise ValueError("config variant 'cfg' (label dropout) needs labels; drop 'cond=0'")
    c = default_config()
    c.data.update(name="digits", resolution=8, channels=1, use_labels=v.cond)
    c.model.arch = "ddpmpp"
    c.model.net.update(
        dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
    )
    if v.cfg:
        c.model.net.label_dropout = 0.1
    c.optim.update(lr=2e-3, lr_rampup_kimg=2.0)
    c.ema.update(halflife_kimg=5.0, rampup_ratio=0.05)
    c.train.update(batch_size=128, total_kimg=60.0)
    c.log.update(log_every_steps=10, checkpoint_every_steps=100, keep_checkpoints=2,
                 sample_every_kimg=20.0, sample_grid=10, sample_steps=18)  # fmt: skip
    return c
