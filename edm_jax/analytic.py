"""Exact denoisers and densities of Gaussian and Gaussian-mixture data.

For p = sum_k w_k N(mu_k, std^2 I) over D features, the noisy density at sigma is
sum_k w_k N(mu_k, (std^2 + sigma^2) I) and its posterior mean (the ideal denoiser) is

    r_k(x) = softmax_k(log w_k - |x - mu_k|^2 / (2 var)),  var = std^2 + sigma^2
    D(x; sigma) = sum_k r_k(x) (std^2 x + sigma^2 mu_k) / var.

Used by the tests (sampler parity, convergence, likelihood) and for sampler studies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from edm_jax.schedules import float_dtype as _dtype

Array = jax.Array


def _flat(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)  # [B,D]


def _sigma_b(sigma, x: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])  # [B]


def mixture_denoiser(means, weights, std: float) -> Callable[[Array, Array], Array]:
    """D(x; sigma) for sum_k w_k N(mu_k, std^2 I); x [B, ...] flattened to D = means.shape[1]."""
    means = jnp.asarray(means)
    log_w = jnp.log(jnp.asarray(weights))

    def denoise(x: Array, sigma) -> Array:
        xf = _flat(x)  # [B,D]
        mu, lw = means.astype(xf.dtype), log_w.astype(xf.dtype)
        s2 = _sigma_b(sigma, xf)[:, None] ** 2  # [B,1]
        var = std**2 + s2
        d2 = jnp.sum((xf[:, None, :] - mu[None]) ** 2, axis=-1)  # [B,K]
        r = jax.nn.softmax(lw[None] - d2 / (2 * var), axis=-1)  # [B,K]
        post_mean = (std**2 * xf[:, None, :] + s2[:, :, None] * mu[None]) / var[:, :, None]
        return jnp.einsum("bk,bkd->bd", r, post_mean).reshape(x.shape)

    return denoise


def gaussian_denoiser(mean, std: float) -> Callable[[Array, Array], Array]:
    """D(x; sigma) = (std^2 x + sigma^2 mean) / (std^2 + sigma^2) for N(mean, std^2 I) data."""
    mean = jnp.asarray(mean)

    def denoise(x: Array, sigma) -> Array:
        s2 = _sigma_b(sigma, x).reshape((-1,) + (1,) * (x.ndim - 1)) ** 2
        return (std**2 * x + s2 * mean.astype(x.dtype)) / (std**2 + s2)

    return denoise


def mixture_log_density(x: Array, sigma, means, weights, std: float) -> Array:
    """log p_sigma(x) [B] of the mixture convolved with N(0, sigma^2 I)."""
    xf = _flat(jnp.asarray(x))
    mu = jnp.asarray(means, xf.dtype)
    var = std**2 + _sigma_b(sigma, xf)[:, None] ** 2  # [B,1]
    d2 = jnp.sum((xf[:, None, :] - mu[None]) ** 2, axis=-1)  # [B,K]
    dim = xf.shape[1]
    log_norm = -0.5 * dim * jnp.log(2 * math.pi * var)  # [B,1]
    log_w = jnp.log(jnp.asarray(weights, xf.dtype))[None]
    return jax.nn.logsumexp(log_w + log_norm - d2 / (2 * var), axis=-1)


def gaussian_log_density(x: Array, sigma, mean, std: float) -> Array:
    """log p_sigma(x) [B] for N(mean, std^2 I) data convolved with N(0, sigma^2 I)."""
    mean = jnp.asarray(mean).reshape(1, -1)
    return mixture_log_density(x, sigma, mean, jnp.ones([1]), std)


def gaussian_pf_ode_solution(x: Array, sigma_from, sigma_to, mean, std: float) -> Array:
    """Exact probability-flow ODE map x(sigma_from) -> x(sigma_to) for N(mean, std^2 I) data.

    dx/dsigma = (x - D(x; sigma))/sigma = sigma (x - mean)/(std^2 + sigma^2), so x - mean
    scales by sqrt((std^2 + sigma_to^2) / (std^2 + sigma_from^2)).
    """
    mean = jnp.asarray(mean, x.dtype)
    ratio = jnp.sqrt(
        (std**2 + jnp.asarray(sigma_to, x.dtype) ** 2)
        / (std**2 + jnp.asarray(sigma_from, x.dtype) ** 2)
    )
    return mean + (x - mean) * ratio


def sample_mixture(rng: Array, n: int, means, weights, std: float) -> Array:
    """n draws [n, D] from sum_k w_k N(mu_k, std^2 I)."""
    means = jnp.asarray(means, _dtype())
    k_comp, k_noise = jax.random.split(rng)
    comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(weights, _dtype())), shape=(n,))
    return means[comp] + std * jax.random.normal(k_noise, (n, means.shape[1]), _dtype())
