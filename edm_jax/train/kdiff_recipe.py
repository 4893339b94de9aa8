"""k-diffusion's training recipe as pure functions: parameter groups, learning-rate schedules,
EMA warmup, class-conditioning dropout and the gradient noise scale (``k_diffusion/utils.py``,
``gns.py`` and the models' ``param_groups``).

- Parameter groups (by torch state_dict name, see ``nets/convert_kdiff.torch_name``):
  HDiT / transformer_v1 have four, [wd, no-wd, mapping wd (lr/3), mapping no-wd (lr/3)];
  "mapping" is the mapping network and every AdaRMSNorm linear, "wd" every ``.weight`` but
  the input embeddings (time / aug / class / mapping-cond projections; transformer_v1's
  ``in_proj`` / ``out_proj`` too). image_v1 has two:
  ``mapping*`` / ``u_net*`` weights decay, the rest does not. ``adamw`` applies them as
  torch's AdamW (decoupled decay, per-group lr).
- Schedules (``lr_used[k]`` is the lr of optimiser step k): ``warmup_k = 1 - warmup**(k+1)``
  times InverseLR ``max(min_lr, lr (1 + k/inv_gamma)**-power)``, ExponentialLR
  ``max(min_lr, lr decay**(k/num_steps))`` or ConstantLRWithWarmup ``lr``.
- EMAWarmup: ``clamp(1 - (1 + e/inv_gamma)**-power, min_value, max_value)``, e = step -
  start_at, 0 before the start.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from edm_jax import losses
from edm_jax.checks import check_choice
from edm_jax.nets.convert_kdiff import torch_name
from edm_jax.nets.kdiff_models import class_cond_dropout  # noqa: F401 - the recipe's piece
from edm_jax.nets.model import is_buffer
from edm_jax.schedules import float_dtype

Array = jax.Array

TRANSFORMER_NO_WD = ("time_in_proj.", "aug_in_proj.", "class_emb.", "mapping_cond_in_proj.")
MAPPING_LR_FACTOR = 1 / 3
LR_SCHEDULES = ("inverse", "exponential", "constant")
SAMPLE_DENSITIES = (
    "lognormal", "loglogistic", "loguniform", "v-diffusion", "cosine", "split-lognormal",
    "cosine-interpolated",
)  # fmt: skip


def param_group(model_type: str, name: str) -> int:
    """The AdamW group index of the parameter ``name`` (torch state_dict name)."""
    if model_type == "image_v1":
        inner = name.removeprefix("inner_model.")
        return 0 if inner.startswith(("mapping", "u_net")) and inner.endswith(".weight") else 1
    if model_type not in ("image_transformer_v1", "image_transformer_v2"):
        raise ValueError(f"no k-diffusion parameter groups for model type {model_type!r}")
    no_wd = TRANSFORMER_NO_WD + (
        ("in_proj.", "out_proj.") if model_type == "image_transformer_v1" else ()
    )
    mapping = name.startswith("mapping.") or ".norm.linear." in name
    wd = name.endswith(".weight") and not name.startswith(no_wd)
    return (2 if mapping else 0) + (0 if wd else 1)


def group_settings(model_type: str, lr: float, weight_decay: float) -> list[tuple[float, float]]:
    """[(lr, weight_decay)] per group, as the models' ``param_groups`` hand them to AdamW."""
    if model_type == "image_v1":
        return [(lr, weight_decay), (lr, 0.0)]
    m = lr * MAPPING_LR_FACTOR
    return [(lr, weight_decay), (lr, 0.0), (m, weight_decay), (m, 0.0)]


def group_tree(params: Any, model_type: str, prefix: str = "") -> Any:
    """The group index of every leaf of a Flax params tree (int pytree)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: param_group(model_type, prefix + torch_name(path)) for path in flat}
    )


def lr_factor(step: Array | int, kind: str, lr: float, *, warmup: float = 0.0, inv_gamma: float = 1.0,
              power: float = 1.0, min_lr: float = 0.0, num_steps: int = 1, decay: float = 0.5,
              ) -> Array:  # fmt: skip
    """The learning rate optimiser step ``step`` uses (k-diffusion's scheduler, closed form)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
    k = jnp.asarray(step, float_dtype())
    ramp = 1 - warmup ** (k + 1)
    if kind == "inverse":
        return ramp * jnp.maximum(min_lr, lr * (1 + k / inv_gamma) ** -power)
    if kind == "exponential":
        return ramp * jnp.maximum(min_lr, lr * (decay ** (1 / num_steps)) ** k)
    return ramp * lr


def lr_schedule(sched: dict, lr: float) -> Callable[[Array], Array]:
    """An optax schedule from k-diffusion's ``lr_sched`` config section."""
    kind = sched.get("type", "constant")
    kwargs = {k: v for k, v in sched.items() if k != "type"}
    lr_factor(0, kind, lr, **kwargs)  # check the names now
    return lambda step: lr_factor(step, kind, lr, **kwargs)


def ema_decay(step: Array | int, *, inv_gamma: float = 1.0, power: float = 1.0, min_value: float = 0.0,
              max_value: float = 1.0, start_at: int = 0) -> Array:  # fmt: skip
    """EMAWarmup's decay for update ``step`` (the epoch counts from ``start_at``, 0 before it)."""
    e = jnp.maximum(jnp.asarray(step) - start_at, 0)
    return jnp.clip(1 - (1 + e / inv_gamma) ** -power, min_value, max_value)


def adamw(
    schedule: Callable[[Array], Array], groups: Any, settings: list[tuple[float, float]], base_lr: float,
    *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> optax.GradientTransformation:  # fmt: skip
    """torch AdamW over parameter groups: group g uses lr ``schedule(k) * lr_g / base_lr`` and
    weight decay ``wd_g`` (decoupled, scaled by the group's lr as torch does)."""
    factors = jax.tree.map(lambda g: settings[g][0] / base_lr, groups)
    decays = jax.tree.map(lambda g: settings[g][1], groups)

    def init(params):
        return optax.scale_by_adam(*betas, eps=eps).init(params)

    def update(grads, state, params=None):
        adam = optax.scale_by_adam(*betas, eps=eps)
        direction, state = adam.update(grads, state, params)
        lr = schedule(state.count - 1)  # the new state counts this step
        updates = jax.tree.map(
            lambda d, p, f, wd: -lr * f * (d + wd * p), direction, params, factors, decays
        )
        return updates, state

    return optax.GradientTransformation(init, update)


def sample_density(model: dict) -> tuple[str, dict]:
    """(density of ``schedules.DENSITIES``, options) of a loaded config's model section, as
    ``K.config.make_sample_density`` builds it (its key aliases and defaults)."""
    sd, sigma_data = model["sigma_sample_density"], model["sigma_data"]
    kind = sd.get("type")
    get = lambda key, alias, default=None: sd.get(alias, sd.get(key, default))  # noqa: E731
    if kind == "lognormal":
        return "lognormal", {"P_mean": get("loc", "mean"), "P_std": get("scale", "std")}
    if kind == "loglogistic":
        return "loglogistic", {"loc": sd.get("loc", math.log(sigma_data)), "scale": sd.get("scale", 0.5),
                               "min_value": sd.get("min_value", 0.0),
                               "max_value": sd.get("max_value", math.inf)}  # fmt: skip
    if kind == "loguniform":
        return "loguniform", {"min_value": sd.get("min_value", model["sigma_min"]),
                              "max_value": sd.get("max_value", model["sigma_max"])}  # fmt: skip
    if kind in ("v-diffusion", "cosine"):
        return "v_diffusion", {"sigma_data": sigma_data, "min_value": sd.get("min_value", 1e-3),
                               "max_value": sd.get("max_value", 1e3)}  # fmt: skip
    if kind == "split-lognormal":
        return "split_lognormal", {"loc": get("loc", "mean"), "scale_1": get("scale_1", "std_1"),
                                   "scale_2": get("scale_2", "std_2")}  # fmt: skip
    if kind == "cosine-interpolated":
        size = max(model["input_size"])
        return "cosine_interpolated", {
            "image_d": sd.get("image_d", size), "noise_d_low": sd.get("noise_d_low", 32),
            "noise_d_high": sd.get("noise_d_high", size), "sigma_data": sigma_data,
            "min_value": sd.get("min_value", min(model["sigma_min"], 1e-3)),
            "max_value": sd.get("max_value", max(model["sigma_max"], 1e3)),
        }  # fmt: skip
    raise ValueError(
        f"unknown sigma_sample_density type {kind!r}; valid: {', '.join(SAMPLE_DENSITIES)}"
    )


@dataclasses.dataclass
class GradientNoiseScale:
    """k-diffusion's ``GradientNoiseScale`` (McCandlish et al. 2018, appendix A.1), host side."""

    beta: float = 0.9998
    eps: float = 1e-8
    ema_sq_norm: float = 0.0
    ema_var: float = 0.0
    beta_cumprod: float = 1.0
    gradient_noise_scale: float = math.nan

    def update(
        self, sq_norm_small: float, sq_norm_large: float, n_small: int, n_large: int
    ) -> None:
        """Fold in one step's ||g_small||^2 (mean over processes) and ||g_large||^2."""
        est_sq_norm = (n_large * sq_norm_large - n_small * sq_norm_small) / (n_large - n_small)
        est_var = (sq_norm_small - sq_norm_large) / (1 / n_small - 1 / n_large)
        self.ema_sq_norm = self.beta * self.ema_sq_norm + (1 - self.beta) * est_sq_norm
        self.ema_var = self.beta * self.ema_var + (1 - self.beta) * est_var
        self.beta_cumprod *= self.beta
        self.gradient_noise_scale = max(self.ema_var, self.eps) / max(self.ema_sq_norm, self.eps)

    def get_stats(self) -> tuple[float, float]:
        """(bias-corrected ||G||^2, bias-corrected trace(Sigma))."""
        correction = 1 - self.beta_cumprod
        return self.ema_sq_norm / correction, self.ema_var / correction


def gns_sq_norms(local_grads: Any) -> tuple[Array, Array]:
    """(mean over processes of ||g_p||^2, ||mean_p g_p||^2) of per-process gradients stacked on
    a leading axis: ``DDPGradientStatsHook``'s statistics."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(local_grads)]
    flat = jnp.concatenate(leaves, axis=1).astype(jnp.float32)
    return jnp.mean(jnp.sum(flat**2, axis=1)), jnp.sum(jnp.mean(flat, axis=0) ** 2)


# --------------------------------------------------------------------------- Denoiser losses


def freq_weight(height: int, width: int, scales: float = 0) -> Array:
    """k-diffusion's ``freq_weight_nd``: min over axes of -log2(linspace(0.5/n, 0.5, n)), each
    clamped at ``scales`` when scales >= 1."""

    def ramp(n):
        w = -jnp.log2(jnp.linspace(0.5 / n, 0.5, n, dtype=jnp.float32))
        return jnp.minimum(w, scales) if scales >= 1 else w

    return jnp.minimum(ramp(height)[:, None], ramp(width)[None, :])


def f_space_weight(weighting: str, sigma: Array, sigma_data: float) -> Array:
    """k-diffusion's w(sigma) on |F - target|^2: our D-space lambda(sigma) times c_out^2."""
    c_out_sq = (sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2)
    return losses.weight(weighting, sigma, sigma_data) * c_out_sq


def denoiser_loss(model_output: Array, target: Array, sigma: Array, *, weighting: str = "karras",
                  scales: float = 1, sigma_data: float = 0.5) -> Array:  # fmt: skip
    """``K.layers.Denoiser.loss`` [B] from the raw output F and its target (NHWC): the mean
    squared error, through an orthonormal DCT-II over H, W with frequency weights when
    ``scales`` != 1, times w(sigma)."""
    err = (model_output - target).astype(jnp.float32)
    if scales != 1:
        err = jax.scipy.fft.dctn(err, type=2, axes=(1, 2), norm="ortho")
        sq = jnp.square(err) * freq_weight(err.shape[1], err.shape[2], scales)[None, :, :, None]
    else:
        sq = jnp.square(err)
    return jnp.mean(sq.reshape(sq.shape[0], -1), axis=1) * f_space_weight(
        weighting, sigma, sigma_data
    )


def simple_loss(noised: Array, denoised: Array, noise: Array, sigma: Array) -> Array:
    """``SimpleLossDenoiser.loss`` [B]: mean(((noised - D) / sigma - noise)^2)."""
    eps = (noised - denoised) / sigma.reshape(-1, *([1] * (noised.ndim - 1)))
    return jnp.mean(jnp.square(eps - noise).reshape(noise.shape[0], -1), axis=1)


def variance_loss(model_output: Array, target: Array, logvar: Array) -> Array:
    """``DenoiserWithVariance.loss`` [B]: mean(((F - target)^2 / exp(logvar) + logvar) / 2)."""
    lv = logvar.reshape(-1, *([1] * (target.ndim - 1)))
    per = (jnp.square(model_output - target) / jnp.exp(lv) + lv) / 2
    return jnp.mean(per.reshape(per.shape[0], -1), axis=1)


# --------------------------------------------------------------------------- the train step


def _zero_buffers(tree: Any) -> Any:
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {k: jnp.zeros_like(v) if is_buffer(k) else v for k, v in flat.items()}
    )


def lerp(start: Array, end: Array, weight) -> Array:
    """torch.lerp: start + w (end - start) for w < 0.5, else end - (1 - w)(end - start) (exact
    at w = 1: the EMA equals the params after EMAWarmup's first, zero-decay update)."""
    return jnp.where(
        weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight)
    )


def clip_grad_norm(max_norm: float = 1.0) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: g * min(1, max_norm / (|g| + 1e-6)) over the whole tree."""

    def clip(updates, params=None):
        del params
        norm = optax.tree.norm(updates)
        return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), updates)

    return optax.stateless(clip)


def check_recipe(config: dict) -> None:
    """One clear error for an optimizer, lr or EMA schedule type k-diffusion's train.py would not
    build (or this port does not: only adamw)."""
    o, lr_sched, ema_sched = config["optimizer"], config["lr_sched"], config["ema_sched"]
    if o.get("type", "adamw") != "adamw":
        raise ValueError(f"optimizer type {o.get('type')!r} is not supported; valid: adamw")
    check_choice("k-diffusion lr_sched type", lr_sched.get("type"), LR_SCHEDULES)
    check_choice("k-diffusion ema_sched type", ema_sched.get("type"), ("inverse",))


def ema_options(config: dict) -> dict:
    """EMAWarmup's options of a loaded config's ema_sched section (for ``ema_decay``)."""
    return {k: v for k, v in config["ema_sched"].items() if k != "type"}


def make_optimizer(config: dict, params: Any, prefix: str = "") -> optax.GradientTransformation:
    """train.py's update: buffers out, ``clip_grad_norm_(1.0)``, AdamW over the model's parameter
    groups with the config's lr schedule (``params`` may be a shape tree)."""
    check_recipe(config)
    o, kind = config["optimizer"], config["model"]["type"]
    settings = group_settings(kind, o["lr"], o.get("weight_decay", 0.0))
    groups = group_tree(params, kind, prefix)
    schedule = lr_schedule(config.get("lr_sched", {"type": "constant"}), o["lr"])
    zero_buffers = optax.stateless(lambda updates, params=None: _zero_buffers(updates))
    return optax.chain(
        zero_buffers, clip_grad_norm(1.0),
        adamw(schedule, groups, settings, o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))),
              eps=o.get("eps", 1e-8)),
        zero_buffers,
    )  # fmt: skip


def make_train_step(net: Any, config: dict, optimizer: optax.GradientTransformation) -> Callable:
    """step(params, opt_state, ema, reals, noise, sigma, ema_decay, **cond) -> (params, opt_state,
    ema, losses [B], grad_norm): train.py's body for one process (mean loss, make_optimizer's
    update, EMA lerp; buffers neither trained nor averaged, copied) from recorded draws."""
    m = config["model"]
    sd = m.get("sigma_data", 1.0)
    weighting, scales = m.get("loss_weighting", "karras"), m.get("loss_scales", 1)

    def losses_fn(params, reals, noise, sigma, cond):
        s = sigma.reshape(-1, *([1] * (reals.ndim - 1)))
        c_skip, c_out, c_in = (
            sd**2 / (s**2 + sd**2),
            s * sd / jnp.sqrt(s**2 + sd**2),
            1 / jnp.sqrt(s**2 + sd**2),
        )
        noised = reals + noise * s
        out = net.apply({"params": params}, noised * c_in, jnp.log(sigma) / 4, **cond, train=True)
        target = (reals - c_skip * noised) / c_out
        losses = denoiser_loss(
            out, target, sigma, weighting=weighting, scales=scales, sigma_data=sd
        )
        return jnp.mean(losses), losses

    def step(params, opt_state, ema, reals, noise, sigma, ema_decay, **cond):
        grads, losses = jax.grad(losses_fn, has_aux=True)(params, reals, noise, sigma, cond)
        norm = optax.tree.norm(_zero_buffers(grads))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        flat_ema, flat_new = traverse_util.flatten_dict(ema), traverse_util.flatten_dict(new)
        ema = traverse_util.unflatten_dict({
            k: v if is_buffer(k) else lerp(flat_ema[k], v, 1 - ema_decay) for k, v in flat_new.items()
        })  # fmt: skip
        return new, opt_state, ema, losses, norm

    return step
