"""ImageNet 64x64, class-conditional ADM (EDM's ImageNet recipe): batch 4096, lr 2e-4, 2500 Mimg.

EMA half-life 50 Mimg, dropout 0.10, no augmentation, bf16 network (EDM trains it in fp16).
Point data.path at an NVlabs/edm dataset zip (``--config.data.path=...``) or use tfds.
"""

from edm_jax.train.config_io import default_config, parse_variant


def get_config(arg=None):
    """EDM's ImageNet-64 settings; variant 'fsdp' shards the parameters over devices."""
    v = parse_variant(arg, fsdp=False)
    c = default_config()
    c.data.update(name="zip", path="datasets/imagenet-64x64.zip", resolution=64, channels=3,
                  use_labels=True, num_workers=8)  # fmt: skip
    c.model.update(arch="adm_imagenet64", dtype="bfloat16")
    c.model.net.dropout = 0.10
    c.optim.update(lr=2e-4, lr_rampup_kimg=10000.0)
    c.ema.update(halflife_kimg=50000.0, rampup_ratio=0.05)
    c.train.update(batch_size=4096, total_kimg=2500000.0, augment_p=0.0, fsdp=v.fsdp)
    c.log.update(log_every_steps=100, checkpoint_every_steps=5000, keep_period_steps=50000,
                 sample_every_kimg=50000.0, sample_grid=10, sample_steps=32)  # fmt: skip
    return c
