"""Train state, Adam with EDM's learning-rate ramp-up, and the two EMA rules.

EDM (Karras et al. 2022, training_loop.py): lr(n) = lr * min(n / n_rampup, 1) with n the
images seen before the step; EMA with a half-life in images, ramped up as
min(halflife, n * rampup_ratio), beta = 0.5^(batch / halflife). EDM2 (Karras et al. 2024,
Sec. 3.1): power-function EMA with exponent gamma, beta_t = (1 - batch / n_t)^(gamma + 1)
where n_t counts images after the step; gamma is chosen by the profile's relative std.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from edm_jax.nets.model import trainable_mask

Array = jax.Array

__all__ = [
    "TrainState",
    "edm_ema_beta",
    "ema_update",
    "exp_to_std",
    "init_state",
    "lr_schedule",
    "make_optimizer",
    "new_state",
    "optim_schedule",
    "power_ema_beta",
    "std_to_exp",
]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be sharded and checkpointed."""

    step: Array  # int32 []
    params: Any  # float32 pytree
    ema: Any  # EDM half-life EMA of params
    power_ema: tuple  # one params pytree per config.ema.power_stds entry (EDM2)
    opt_state: Any
    rng: Array  # uint32 key data of the run's base key; step keys are fold_in(key, step)


def lr_schedule(lr: float, rampup_kimg: float, batch_size: int) -> Callable[[Array], Array]:
    """count -> lr * min(count * batch / (rampup_kimg * 1000), 1) (EDM training_loop)."""
    rampup_nimg = max(rampup_kimg * 1000.0, 1e-8)

    def schedule(count: Array) -> Array:
        nimg = count.astype(jnp.result_type(float)) * batch_size
        return lr * jnp.minimum(nimg / rampup_nimg, 1.0)

    return schedule


def _labels(params: Any) -> Any:
    """'train' for trained parameters, 'frozen' for buffers (NCSN++ Fourier frequencies)."""
    return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params))


def optim_schedule(optim: Mapping[str, Any], batch_size: int) -> Callable[[Array], Array]:
    """count -> lr: EDM's ramp-up, or EDM2's inverse-sqrt decay (optim.schedule = 'edm2')."""
    name = optim.get("schedule", "edm")
    if name not in ("edm", "edm2"):
        raise ValueError(f"config.optim.schedule={name!r} is not valid; valid: ['edm', 'edm2']")
    if name == "edm2":
        from edm_jax.train.edm2 import edm2_lr_schedule

        return edm2_lr_schedule(
            batch_size, optim["lr"], optim["ref_batches"], optim["lr_rampup_kimg"] / 1000.0
        )
    return lr_schedule(optim["lr"], optim["lr_rampup_kimg"], batch_size)


def make_optimizer(optim: Mapping[str, Any], batch_size: int) -> optax.GradientTransformation:
    """Adam (EDM: betas 0.9/0.999, eps 1e-8) with the lr schedule, optional clipping, buffers frozen.

    ``optim`` holds lr, lr_rampup_kimg, b1, b2, eps, grad_clip (the config's optim section) and
    optionally schedule/ref_batches (EDM2). Build it once and give the same object to
    ``new_state`` and the train step.
    """
    schedule = optim_schedule(optim, batch_size)
    chain = [optax.clip_by_global_norm(optim["grad_clip"])] if optim["grad_clip"] > 0 else []
    chain += [optax.scale_by_adam(b1=optim["b1"], b2=optim["b2"], eps=optim["eps"])]
    chain += [optax.scale_by_learning_rate(schedule)]
    return optax.multi_transform(
        {"train": optax.chain(*chain), "frozen": optax.set_to_zero()}, _labels
    )


def edm_ema_beta(nimg: Array, batch_size: int, halflife_kimg: float, rampup_ratio: float) -> Array:
    """EDM's EMA decay for the step that starts at nimg images: 0.5^(batch / halflife)."""
    halflife = jnp.asarray(halflife_kimg * 1000.0, jnp.result_type(float))
    if rampup_ratio > 0:
        halflife = jnp.minimum(halflife, nimg.astype(jnp.result_type(float)) * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def std_to_exp(std: float) -> float:
    """EDM2 power-EMA exponent gamma whose profile has relative std `std` (EDM2 eq. 3 inverse)."""
    t = float(std) ** -2  # std^2 = (g+1) / ((g+2)^2 (g+3))  <=>  g^3 + 7g^2 + (16-t)g + 12-t = 0
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def exp_to_std(gamma: float) -> float:
    """Relative std of the power-function EMA profile with exponent gamma (EDM2 eq. 3)."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def power_ema_beta(nimg_after: Array, batch_size: int, gamma: float) -> Array:
    """EDM2 power-function EMA decay: (1 - batch / nimg_after)^(gamma + 1)."""
    t = nimg_after.astype(jnp.result_type(float))
    return jnp.maximum(1.0 - batch_size / t, 0.0) ** (gamma + 1.0)


def ema_update(ema: Any, params: Any, beta: Array) -> Any:
    """ema <- beta * ema + (1 - beta) * params (torch's params.lerp(ema, beta))."""
    return jax.tree.map(lambda e, p: p + beta * (e - p), ema, params)


def new_state(
    rng: Array, model, tx: optax.GradientTransformation, num_power_emas: int = 0
) -> TrainState:
    """Fresh state: params from model.init(rng), EMAs equal to params, tx's state (Adam moments 0)."""
    k_init, k_run = jax.random.split(rng)
    params = model.init(k_init)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        ema=params,
        power_ema=tuple(params for _ in range(num_power_emas)),
        opt_state=tx.init(params),
        rng=jax.random.key_data(k_run),
    )


def init_state(
    rng: Array,
    model,
    config: ml_collections.ConfigDict,
    *,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """new_state for a training config; pass the step's `tx` (else it is built from config.optim)."""
    if tx is None:
        tx = make_optimizer(config.optim, config.train.batch_size)
    return new_state(rng, model, tx, len(config.ema.power_stds))
