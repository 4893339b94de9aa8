"""EDM2 training recipe pieces (Karras et al. 2024): inverse-sqrt learning rate, Adam 0.9/0.99.

``learning_rate_schedule`` is NVlabs/edm2 ``training_loop.learning_rate_schedule``:
lr = ref_lr / sqrt(max(nimg / (ref_batches * batch), 1)) * min(nimg / (rampup_Mimg 1e6), 1),
each factor only where its setting is positive (eq. 67-68 of the paper).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["edm2_lr_schedule", "learning_rate_schedule"]


def learning_rate_schedule(
    cur_nimg,
    batch_size: int,
    ref_lr: float = 100e-4,
    ref_batches: float = 70e3,
    rampup_Mimg: float = 10,
):
    """EDM2 learning rate at cur_nimg images (numpy or jax scalar/array in, same out)."""
    xp = jnp if isinstance(cur_nimg, jax.Array) else __import__("numpy")
    lr = ref_lr * xp.ones_like(xp.asarray(cur_nimg, dtype=float))
    if ref_batches > 0:
        lr = lr / xp.sqrt(xp.maximum(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr = lr * xp.minimum(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


def edm2_lr_schedule(
    batch_size: int, ref_lr: float, ref_batches: float, rampup_Mimg: float
) -> Callable[[Array], Array]:
    """optax schedule: step count -> lr at nimg = count * batch (the images before the step)."""

    def schedule(count: Array) -> Array:
        nimg = count.astype(jnp.result_type(float)) * batch_size
        return learning_rate_schedule(nimg, batch_size, ref_lr, ref_batches, rampup_Mimg)

    return schedule
