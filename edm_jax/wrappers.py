"""Denoisers from eps-, v- and x0-prediction models (k-diffusion ``external.py`` equivalents).

Each wrapper is a frozen dataclass holding a model ``model(x_in, t, **cond)`` (bind params
with ``functools.partial``) and is itself a denoiser ``wrapper(x, sigma, **cond) -> D``.
With sigma_data = 1 (variance-preserving models) EDM eq. 7 gives, for
x = x_0 + sigma eps and x_in = c_in x = x / sqrt(sigma^2 + 1):

- eps-prediction: D = x - sigma eps                   (c_skip = 1, c_out = -sigma)
- v-prediction:   D = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
- x0-prediction:  D = model output.

Continuous models take t = ``sigma_to_t(sigma)`` (default atan(sigma) 2/pi, as
v-diffusion); discrete DDPM models take the timestep index t in [0, T-1] of the
``alphas_cumprod`` table, fractional unless ``quantize``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "DiscreteEpsDDPMDenoiser",
    "DiscreteSchedule",
    "DiscreteVDDPMDenoiser",
    "EpsDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "atan_sigma_to_t",
    "atan_t_to_sigma",
]


def _f(x) -> Array:
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.asarray(x, dtype)


def _expand(c: Array, ndim: int) -> Array:
    """[B] -> [B, 1, ..., 1]."""
    return c.reshape(c.shape + (1,) * (ndim - 1))


def atan_sigma_to_t(sigma) -> Array:
    """Continuous time of v-diffusion: t = atan(sigma) 2/pi in [0, 1]."""
    return jnp.arctan(_f(sigma)) * (2 / math.pi)


def atan_t_to_sigma(t) -> Array:
    """sigma = tan(t pi/2), the inverse of ``atan_sigma_to_t``."""
    return jnp.tan(_f(t) * (math.pi / 2))


def _vp_inputs(x, sigma) -> tuple[Array, Array, Array]:
    """x as float, sigma as [B] and [B,1,..,1]: common prologue of every wrapper."""
    x = _f(x)
    sigma = jnp.broadcast_to(_f(sigma), x.shape[:1])  # [B]
    return x, sigma, _expand(sigma, x.ndim)


def _eps_to_D(x, s, eps) -> Array:
    """D = x - sigma eps (EDM eq. 7 with c_skip = 1, c_out = -sigma)."""
    return x - s * eps.astype(x.dtype)


def _v_to_D(x, s, v) -> Array:
    """D = c_skip x + c_out v with c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1)."""
    return x / (s**2 + 1) - s / jnp.sqrt(s**2 + 1) * v.astype(x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class EpsDenoiser:
    """A continuous-time eps-prediction model ``model(x / sqrt(sigma^2+1), t, **cond)``."""

    model: Callable[..., Array]
    sigma_to_t: Callable[[Array], Array] = atan_sigma_to_t

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = x - sigma eps."""
        x, sigma, s = _vp_inputs(x, sigma)
        return _eps_to_D(x, s, self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond))


@dataclasses.dataclass(frozen=True, eq=False)
class VDenoiser:
    """A continuous-time v-prediction model (v-diffusion-pytorch) ``model(x_in, t, **cond)``."""

    model: Callable[..., Array]
    sigma_to_t: Callable[[Array], Array] = atan_sigma_to_t

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = x / (s^2+1) - s v / sqrt(s^2+1)."""
        x, sigma, s = _vp_inputs(x, sigma)
        return _v_to_D(x, s, self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond))


@dataclasses.dataclass(frozen=True, eq=False)
class X0Denoiser:
    """A continuous-time x0-prediction model: D is the model output itself."""

    model: Callable[..., Array]
    sigma_to_t: Callable[[Array], Array] = atan_sigma_to_t

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = model(x / sqrt(sigma^2+1), t)."""
        x, sigma, s = _vp_inputs(x, sigma)
        out = self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond)
        return out.astype(x.dtype)


class _DiscreteTable:
    """sigma <-> t maps of a DDPM ``alphas_cumprod`` table (shared by the discrete wrappers).

    sigma_t = sqrt((1 - alphabar_t) / alphabar_t), increasing in t. Between table entries
    t is interpolated linearly in log sigma, or rounded to the nearest if ``quantize``.
    """

    alphas_cumprod: np.ndarray
    quantize: bool

    def __post_init__(self):
        ac = np.asarray(self.alphas_cumprod, np.float64)
        if ac.ndim != 1 or ac.size < 2 or not np.all((ac > 0) & (ac < 1)):
            raise ValueError(f"alphas_cumprod must be 1-D with >= 2 values in (0, 1), got {ac}")
        if not np.all(np.diff(ac) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        object.__setattr__(self, "alphas_cumprod", ac)

    @property
    def sigmas(self) -> Array:
        """sigma_t for t = 0..T-1 [T], increasing."""
        ac = self.alphas_cumprod
        return _f(np.sqrt((1 - ac) / ac))

    @property
    def sigma_min(self) -> Array:
        """sigma_0."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Array:
        """sigma_{T-1}."""
        return self.sigmas[-1]

    def sigma_to_t(self, sigma, quantize: bool | None = None) -> Array:
        """Timestep t of sigma: nearest index if quantizing, else log-linear interpolation."""
        quantize = self.quantize if quantize is None else quantize
        log_sigmas = jnp.log(self.sigmas)  # [T]
        log_sigma = jnp.log(_f(sigma))
        if quantize:
            return jnp.argmin(jnp.abs(log_sigma[..., None] - log_sigmas), axis=-1)
        T = log_sigmas.shape[0]
        low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, T - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = jnp.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t) -> Array:
        """sigma at (fractional) timestep t, interpolating log sigma linearly."""
        t = _f(t)
        log_sigmas = jnp.log(self.sigmas)
        low, high = jnp.floor(t).astype(jnp.int32), jnp.ceil(t).astype(jnp.int32)
        w = t - jnp.floor(t)
        return jnp.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])

    def get_sigmas(self, n: int | None = None) -> Array:
        """n + 1 sigmas ending in 0, evenly spaced in t from T-1 down to 0 (all T if n is None)."""
        if n is None:
            return jnp.concatenate([self.sigmas[::-1], jnp.zeros([1], self.sigmas.dtype)])
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (number of sigmas) must be an int >= 1 or None, got {n!r}")
        t = jnp.linspace(len(self.alphas_cumprod) - 1, 0, n)
        return jnp.concatenate([self.t_to_sigma(t), jnp.zeros([1], self.sigmas.dtype)])


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule(_DiscreteTable):
    """The map between sigmas and the timesteps t = 0..T-1 of a DDPM ``alphas_cumprod``."""

    alphas_cumprod: np.ndarray
    quantize: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteEpsDDPMDenoiser(_DiscreteTable):
    """A discrete DDPM eps-prediction model ``model(x / sqrt(sigma^2+1), t, **cond)``."""

    model: Callable[..., Array]
    alphas_cumprod: np.ndarray
    quantize: bool = False

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = x - sigma eps(x_in, t(sigma))."""
        x, sigma, s = _vp_inputs(x, sigma)
        return _eps_to_D(x, s, self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond))


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVDDPMDenoiser(_DiscreteTable):
    """A discrete DDPM v-prediction model ``model(x / sqrt(sigma^2+1), t, **cond)``."""

    model: Callable[..., Array]
    alphas_cumprod: np.ndarray
    quantize: bool = False

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = x / (s^2+1) - s v / sqrt(s^2+1)."""
        x, sigma, s = _vp_inputs(x, sigma)
        return _v_to_D(x, s, self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond))
