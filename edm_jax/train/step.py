"""The sharded train step: one jax.jit over a Mesh of every device of every host.

The global batch is sharded along the mesh's 'data' axis; the state is replicated, or
FSDP-style sharded (each large array split along one axis over 'data'). Gradients are
accumulated over micro-batches with lax.scan, averaged, made finite as EDM does
(nan -> 0, +-inf -> +-1e5), then Adam and both EMAs are applied. The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edm_jax import losses
from edm_jax.data.augment import augment
from edm_jax.data.kdiff_augment import karras_augment
from edm_jax.nets.edm2_unet import edm2_logvar
from edm_jax.nets.kdiff_models import state_dict_prefix
from edm_jax.nets.spec import KDIFF_ARCH
from edm_jax.sharding import BATCH, DATA_AXIS, make_mesh
from edm_jax.train import kdiff_recipe
from edm_jax.train.state import (
    TrainState,
    edm_ema_beta,
    ema_update,
    make_optimizer,
    new_state,
    optim_schedule,
    power_ema_beta,
    std_to_exp,
)

Array = jax.Array

__all__ = [
    "StepConfig", "Trainer", "batch_sharding", "make_mesh", "make_train_step", "state_sharding",
]  # fmt: skip

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_saveable,  # keep conv/matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step reads from a training config, resolved once at the edge."""

    batch_size: int
    grad_accum: int = 1
    augment_p: float = 0.0
    remat: str = "none"
    self_cond_prob: float = 0.5
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05
    power_stds: tuple[float, ...] = ()
    loss: losses.LossSpec | losses.EDM2LossSpec = dataclasses.field(default_factory=losses.LossSpec)
    augment: str = "edm"  # 'karras': k-diffusion's KarrasAugmentationPipeline (always runs)
    ema_warmup: tuple | None = None  # k-diffusion's EMAWarmup (option, value) pairs
    gns: bool = False  # report the micro-batch gradients' squared norms (gradient noise scale)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepConfig:
        """The step's settings of a config (train.*, ema.*, loss.*; a k-diffusion network's
        augmentation and EMA warmup from its config)."""
        t, e = config.train, config.ema
        kdiff: dict[str, Any] = {}
        if config.model.arch == KDIFF_ARCH:
            options = kdiff_recipe.ema_options(json.loads(config.model.kdiff_config))
            kdiff = {"augment": "karras", "ema_warmup": tuple(sorted(options.items()))}
        return cls(
            batch_size=t.batch_size, grad_accum=t.grad_accum, augment_p=t.augment_p,
            remat=t.remat, self_cond_prob=t.self_cond_prob, ema_halflife_kimg=e.halflife_kimg,
            ema_rampup_ratio=e.rampup_ratio, power_stds=tuple(e.power_stds), gns=t.gns,
            loss=losses.from_config(config.loss.to_dict()), **kdiff,
        )  # fmt: skip


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, BATCH)


def _fsdp_spec(shape: tuple, n: int, min_size: int) -> PartitionSpec:
    """Split the largest axis divisible by n over 'data' if the array is large enough."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return PartitionSpec(*[(DATA_AXIS if a == axis else None) for a in range(len(shape))])
    return PartitionSpec()


def state_sharding(state_shape: Any, mesh: Mesh, fsdp: bool = False, min_size: int = 2**18):
    """NamedShardings for a TrainState (shape tree): replicated, or FSDP for large arrays."""
    n = mesh.devices.size

    def spec(x):
        if not fsdp or x.ndim == 0:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, _fsdp_spec(tuple(x.shape), n, min_size))

    return jax.tree.map(spec, state_shape)


def _micro_batches(batch: dict, accum: int, mesh: Mesh) -> dict:
    """[G, ...] -> [A, G/A, ...], micro-batch a = rows a, a+A, ...: each stays spread over devices."""

    def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, DATA_AXIS, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _denoiser(model, rng: Array, remat: str) -> Callable:
    """denoise(params, x, sigma, **cond) in training mode with dropout key rng (and remat)."""

    def denoise(params, x, sigma, **cond):
        return model.denoise(params, x, sigma, train=True, rng=rng, **cond)

    if remat in REMAT_POLICIES:
        return jax.checkpoint(denoise, policy=REMAT_POLICIES[remat])
    return denoise


def _self_cond_denoiser(model, rng: Array, remat: str, prob: float) -> Callable:
    """Analog Bits self-conditioning: on a fraction prob of steps, first estimate x0 (no grad)."""
    k_coin, k_first, k_second = jax.random.split(rng, 3)

    def denoise(params, x, sigma, **cond):
        def estimate(_):
            d = model.denoise(params, x, sigma, train=True, rng=k_first, **cond)
            return jax.lax.stop_gradient(d)

        use = jax.random.bernoulli(k_coin, prob)
        sc = jax.lax.cond(use, estimate, lambda _: jnp.zeros_like(x), None)
        inner = _denoiser(model, k_second, remat)
        return inner(params, x, sigma, self_cond=sc, **cond)

    return denoise


_LATENT_KEY = 0x1A7E  # fold_in tag of the latent draw (the other keys stay as without it)


def _draw_latents(rng, raw):
    """EDM2 final latents of stored raw latents [B,h,w,2L]: (mean + std * N(0,1)) * s + b."""
    from edm_jax.data.latents import final_latents, latent_scale_bias

    scale, bias = latent_scale_bias()
    noise = jax.random.normal(rng, (*raw.shape[:-1], raw.shape[-1] // 2), jnp.float32)
    return final_latents(raw, noise, scale, bias)


def _karras_augment(rng, batch: dict, a_prob: float):
    """(images, aug_cond [B, 9]) as k-diffusion's KarrasAugmentationPipeline(a_prob,
    disable_all=a_prob == 0): at 0 the images stay and aug_cond is zero (no x-flips either)."""
    x = batch["image"]
    if a_prob == 0:
        return x, jnp.zeros((x.shape[0], 9), x.dtype)
    return karras_augment(rng, x, a_prob=a_prob)


def make_loss_fn(model, hp: StepConfig) -> Callable:
    """loss_fn(rng, params, micro_batch) -> (loss, aux): augmentation, dropout, self-cond."""

    def loss_fn(rng, params, batch):
        k_aug, k_drop, k_loss = jax.random.split(rng, 3)
        batch = {"image": batch["image"], "label": batch["label"] if model.label_dim else None}
        if getattr(model, "encoder", None):  # raw latents -> mean + std * noise, fresh each step
            batch["image"] = _draw_latents(jax.random.fold_in(rng, _LATENT_KEY), batch["image"])
        if hp.augment == "karras":  # k-diffusion's train.py: disable_all at augment_prob 0
            batch["image"], batch["augment_labels"] = _karras_augment(k_aug, batch, hp.augment_p)
        elif hp.augment_p > 0:
            batch["image"], batch["augment_labels"] = augment(k_aug, batch["image"], p=hp.augment_p)
        if model.self_cond:
            denoise = _self_cond_denoiser(model, k_drop, hp.remat, hp.self_cond_prob)
        else:
            denoise = _denoiser(model, k_drop, hp.remat)
        logvar = functools.partial(edm2_logvar, model)  # EDM2's loss: the net's uncertainty head
        return losses.training_loss(hp.loss, k_loss, params, batch, denoise=denoise, logvar=logvar)

    return loss_fn


def _sq_norm(tree) -> Array:
    """Squared L2 norm of a pytree, in float32."""
    return jnp.asarray(
        sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree))
    )


def _accumulate_grads(loss_fn, params, batch, rng, accum, mesh, with_sq=False):
    """Mean loss, mean gradient and the mean squared norm of the micro-batch gradients over
    accum micro-batches (one lax.scan; the gradient noise scale's small-batch statistic)."""
    grad_fn = jax.value_and_grad(lambda p, k, b: loss_fn(k, p, b)[0])
    if accum == 1:  # no loop: XLA:CPU runs convolutions inside a while loop far slower
        loss, grads = grad_fn(params, jax.random.split(rng, 1)[0], batch)
        return loss, grads, None
    micro = _micro_batches(batch, accum, mesh)
    keys = jax.random.split(rng, accum)

    def body(carry, xs):
        loss_sum, grad_sum, sq_sum = carry
        key, mb = xs
        loss, grads = grad_fn(params, key, mb)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        sq_sum = sq_sum + _sq_norm(grads) if with_sq else sq_sum
        return (loss_sum + loss, grad_sum, sq_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros([]), zeros, jnp.zeros([], jnp.float32))
    (loss_sum, grad_sum, sq_sum), _ = jax.lax.scan(body, init, (keys, micro))
    sq_mean = sq_sum / accum if with_sq else None
    return loss_sum / accum, jax.tree.map(lambda g: g / accum, grad_sum), sq_mean


def _update_emas(state: TrainState, params, hp: StepConfig):
    """EDM half-life EMA and EDM2 power EMAs after the step that began at state.step."""
    b = hp.batch_size
    nimg = state.step.astype(jnp.float32) * b
    if hp.ema_warmup is not None:  # k-diffusion: EMAWarmup's decay at the step's index
        beta = kdiff_recipe.ema_decay(state.step, **dict(hp.ema_warmup)).astype(jnp.float32)
    else:
        beta = edm_ema_beta(nimg, b, hp.ema_halflife_kimg, hp.ema_rampup_ratio)
    ema = ema_update(state.ema, params, beta)
    power = tuple(
        ema_update(e, params, power_ema_beta(nimg + b, b, std_to_exp(s)))
        for e, s in zip(state.power_ema, hp.power_stds, strict=True)
    )
    return ema, power, beta


def train_step_fn(model, hp: StepConfig, tx: optax.GradientTransformation, mesh: Mesh) -> Callable:
    """The un-jitted step: (state, global batch) -> (state, metrics), with the optimizer tx."""
    loss_fn = make_loss_fn(model, hp)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        params = model.prepare_params(state.params)  # EDM2: forced weight normalisation
        loss, grads, sq_small = _accumulate_grads(
            loss_fn, params, batch, rng, hp.grad_accum, mesh, with_sq=hp.gns
        )
        gns = {} if sq_small is None else {
            "gns_sq_norm_small": sq_small, "gns_sq_norm_large": _sq_norm(grads)}  # fmt: skip
        grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        ema, power, beta = _update_emas(state, params, hp)
        new = state.replace(  # type: ignore[attr-defined]  # flax.struct adds replace
            step=state.step + 1, params=params, ema=ema, power_ema=power, opt_state=opt_state
        )
        grad_norm = jnp.sqrt(_sq_norm(grads))
        return new, {"loss": loss, "grad_norm": grad_norm, "ema_beta": beta, **gns}

    return step


def jit_train_step(step: Callable, mesh: Mesh, shardings: Any) -> Callable:
    """jax.jit of a step with state shardings in and out, batch on 'data', state donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A model, its optimizer (built once) and the step's settings: init and step share tx."""

    model: Any
    tx: optax.GradientTransformation
    hp: StepConfig
    lr_fn: Callable[[Array], Array] | None = None  # step -> lr (of the first group), for logs

    @classmethod
    def from_config(cls, model, config: ml_collections.ConfigDict) -> Trainer:
        """The optimizer of config.optim (a k-diffusion network: its config's AdamW recipe) and
        the step settings of config.train/ema/loss."""
        hp = StepConfig.from_config(config)
        if config.optim.schedule == "kdiffusion":
            shapes = jax.eval_shape(model.init, jax.random.key(0))
            lr = config.optim.lr  # the file's optimizer.lr, or --config.optim.lr (train.py --lr)
            kconfig = {**model.config, "optimizer": {**model.config["optimizer"], "lr": lr}}
            tx = kdiff_recipe.make_optimizer(kconfig, shapes, state_dict_prefix(kconfig))
            return cls(model, tx, hp, kdiff_recipe.lr_schedule(kconfig["lr_sched"], lr))
        tx = make_optimizer(config.optim, config.train.batch_size)
        return cls(model, tx, hp, optim_schedule(config.optim, config.train.batch_size))

    def init(self, rng: Array) -> TrainState:
        """A fresh TrainState (jit it with the state shardings as out_shardings)."""
        return new_state(rng, self.model, self.tx, len(self.hp.power_stds))

    def step_fn(self, mesh: Mesh) -> Callable:
        """The un-jitted step (state, batch) -> (state, metrics)."""
        return train_step_fn(self.model, self.hp, self.tx, mesh)

    def jit_step(self, mesh: Mesh, shardings: Any) -> Callable:
        """The sharded, donating jit of the step."""
        return jit_train_step(self.step_fn(mesh), mesh, shardings)


def make_train_step(
    model,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    shardings: Any,
    *,
    tx: optax.GradientTransformation | None = None,
):
    """The jitted step of a config; pass the `tx` the state was made with (else built here)."""
    trainer = Trainer.from_config(model, config)
    if tx is not None:
        trainer = dataclasses.replace(trainer, tx=tx)
    return trainer.jit_step(mesh, shardings)
