"""Denoising score-matching losses of NVlabs/edm ``loss.py`` (EDM eq. 2, Table 1).

Each loss is a pure function ``loss(rng, params, batch, *, denoise, ...) -> (loss, aux)``:
sigma ~ p_train, n ~ N(0, sigma^2 I), loss = E[lambda(sigma) |D(y + n; sigma) - y|^2], averaged
over pixels and batch. ``denoise(params, x, sigma, **cond)`` comes from ``make_denoiser``.
``batch`` = {'image': [B, H, W, C], optional 'label', optional 'augment_labels'}.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from edm_jax import schedules

Array = jax.Array
Weighting = str | Callable[[Array], Array]


def weight(weighting: Weighting, sigma: Array, sigma_data: float = 0.5) -> Array:
    """lambda(sigma) on |D - y|^2 for k-diffusion's weightings (and 'vp'/'ve': 1/sigma^2).

    k-diffusion weights the F-space error |F - target|^2 = |D - y|^2 / c_out^2 by w(sigma),
    so lambda = w / c_out^2 with EDM's c_out: 'karras' (w = 1) is EDM's
    (sigma^2 + sd^2)/(sigma sd)^2, 'snr' is 1/sigma^2, 'soft-min-snr' is 1/(sigma^2 + sd^2).
    """
    if callable(weighting):
        return weighting(sigma)
    sd2 = sigma_data**2
    table = {
        "karras": lambda s: (s**2 + sd2) / (s**2 * sd2),
        "snr": lambda s: 1 / s**2,
        "soft-min-snr": lambda s: 1 / (s**2 + sd2),
    }
    if weighting not in table:
        raise ValueError(
            f"unknown loss weighting {weighting!r}; valid: {sorted(table)} or a callable"
        )
    return table[weighting](sigma)


WEIGHTINGS = ("karras", "snr", "soft-min-snr")


def _cond(batch: dict) -> dict:
    """Conditioning keyword arguments for the denoiser from a batch."""
    cond = {}
    if batch.get("label") is not None:
        cond["labels"] = batch["label"]
    if batch.get("augment_labels") is not None:
        cond["augment_labels"] = batch["augment_labels"]
    return cond


def denoising_loss(
    rng: Array, params: Any, batch: dict, sigma: Array, lam: Array, *, denoise: Callable
) -> tuple[Array, dict]:
    """E[lambda |D(y + sigma n; sigma) - y|^2] for given per-example sigma [B] and lambda [B]."""
    y = batch["image"]  # [B,H,W,C]
    y = y.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    n = jax.random.normal(rng, y.shape, y.dtype) * sigma.reshape((-1,) + (1,) * (y.ndim - 1))
    D_yn = denoise(params, y + n, sigma, **_cond(batch))
    per_example = lam * jnp.mean((D_yn - y) ** 2, axis=tuple(range(1, y.ndim)))  # [B]
    return jnp.mean(per_example), {"per_example": per_example, "sigma": sigma}


def _split(rng: Array) -> tuple[Array, Array]:
    k_sigma, k_noise = jax.random.split(rng)
    return k_sigma, k_noise


def edm_loss(
    rng: Array,
    params: Any,
    batch: dict,
    *,
    denoise: Callable,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    weighting: Weighting = "karras",
) -> tuple[Array, dict]:
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2)/(sigma sd)^2."""
    weight(weighting, jnp.ones([]), sigma_data)  # validate the name before tracing further
    k_sigma, k_noise = _split(rng)
    sigma = schedules.lognormal(k_sigma, batch["image"].shape[:1], P_mean, P_std)
    lam = weight(weighting, sigma, sigma_data)
    return denoising_loss(k_noise, params, batch, sigma, lam, denoise=denoise)


def vp_loss(
    rng: Array,
    params: Any,
    batch: dict,
    *,
    denoise: Callable,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    epsilon_t: float = 1e-5,
    weighting: Weighting = "snr",
    sigma_data: float = 0.5,
) -> tuple[Array, dict]:
    """VP loss: sigma = sigma(t), t ~ U(epsilon_t, 1), lambda = 1/sigma^2."""
    weight(weighting, jnp.ones([]), sigma_data)
    k_sigma, k_noise = _split(rng)
    sigma = schedules.vp_uniform(k_sigma, batch["image"].shape[:1], beta_d, beta_min, epsilon_t)
    lam = weight(weighting, sigma, sigma_data)
    return denoising_loss(k_noise, params, batch, sigma, lam, denoise=denoise)


def ve_loss(
    rng: Array,
    params: Any,
    batch: dict,
    *,
    denoise: Callable,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    weighting: Weighting = "snr",
    sigma_data: float = 0.5,
) -> tuple[Array, dict]:
    """VE loss: ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1/sigma^2."""
    weight(weighting, jnp.ones([]), sigma_data)
    k_sigma, k_noise = _split(rng)
    sigma = schedules.ve_uniform(k_sigma, batch["image"].shape[:1], sigma_min, sigma_max)
    lam = weight(weighting, sigma, sigma_data)
    return denoising_loss(k_noise, params, batch, sigma, lam, denoise=denoise)


LOSSES: dict[str, Callable[..., tuple[Array, dict]]] = {
    "edm": edm_loss,
    "vp": vp_loss,
    "ve": ve_loss,
}


def make_loss(name: str, denoise: Callable, **kwargs) -> Callable[..., tuple[Array, dict]]:
    """``loss_fn(rng, params, batch)`` for the loss `name` with its options bound."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
    if "weighting" in kwargs:
        weight(kwargs["weighting"], jnp.ones([]))
    return functools.partial(LOSSES[name], denoise=denoise, **kwargs)


# --- EDM2 (Karras et al. 2024, eq. 21): learned uncertainty weighting ------------------------


def edm2_loss(
    rng: Array,
    params: Any,
    batch: dict,
    *,
    denoise: Callable,
    logvar: Callable,
    P_mean: float = -0.4,
    P_std: float = 1.0,
    sigma_data: float = 0.5,
    rnd_normal: Array | None = None,
    noise: Array | None = None,
) -> tuple[Array, dict]:
    """EDM2Loss: sum of lambda/exp(u) |D(y + n; sigma) - y|^2 + u over elements, / batch.

    ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2)/(sigma sd)^2 and
    u = ``logvar(params, sigma) -> [B]`` the learned uncertainty. ``rnd_normal`` [B] and
    ``noise`` (shaped like the images, before the multiplication by sigma) replace the two
    draws from rng when given (to reproduce recorded draws).
    """
    y = batch["image"]  # [B,H,W,C]
    y = y.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    k_sigma, k_noise = _split(rng)
    if rnd_normal is None:
        rnd_normal = jax.random.normal(k_sigma, y.shape[:1], y.dtype)
    if noise is None:
        noise = jax.random.normal(k_noise, y.shape, y.dtype)
    sigma = jnp.exp(jnp.reshape(rnd_normal, (-1,)).astype(y.dtype) * P_std + P_mean)  # [B]
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    s = sigma.reshape((-1,) + (1,) * (y.ndim - 1))
    D_yn = denoise(params, y + noise.astype(y.dtype) * s, sigma, **_cond(batch))
    u = logvar(params, sigma).reshape(s.shape).astype(y.dtype)  # [B,1,1,1]
    per_elem = (lam.reshape(s.shape) / jnp.exp(u)) * (D_yn - y) ** 2 + u
    per_example = jnp.sum(per_elem, axis=tuple(range(1, y.ndim)))  # [B]
    loss = jnp.sum(per_example) / y.shape[0]
    return loss, {
        "per_example": per_example,
        "sigma": sigma,
        "logvar": u.reshape(-1),
        "denoised": D_yn,
    }


LOSSES["edm2"] = edm2_loss
