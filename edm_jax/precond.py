"""Preconditioning of EDM Table 1: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

Four formulations, as NVlabs/edm ``training/networks.py``: EDM, VP, VE and iDDPM. Each is
a frozen dataclass with ``scalings(sigma) -> (c_skip, c_out, c_in, c_noise)``;
``make_denoiser`` wraps a raw network into ``denoise(params, x, sigma, **cond)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.checks import check_choice, check_positive
from edm_jax.samplers.core import append_dims
from edm_jax.schedules import VP_BETA_D, VP_BETA_MIN, VPSchedule, float_dtype, iddpm_u_table

Array = jax.Array


class Scalings(NamedTuple):
    """The four preconditioning coefficients, each shaped like sigma."""

    c_skip: Array
    c_out: Array
    c_in: Array
    c_noise: Array


def _f(sigma) -> Array:
    """sigma as a float array (float64 when x64 is on)."""
    return jnp.asarray(sigma, float_dtype())


@dataclasses.dataclass(frozen=True)
class EDMPrecond:
    """EDM preconditioning (Table 1, 'Ours'): unit-variance input and training target."""

    sigma_data: float = 0.5
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    out_channels_factor = 1

    def __post_init__(self):
        check_positive("sigma_data", self.sigma_data)

    def scalings(self, sigma) -> Scalings:
        """c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
        s, sd = _f(sigma), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / jnp.sqrt(s**2 + sd**2)
        c_in = 1 / jnp.sqrt(sd**2 + s**2)
        return Scalings(c_skip, c_out, c_in, jnp.log(s) / 4)

    def round_sigma(self, sigma) -> Array:
        """Identity: EDM supports continuous sigma."""
        return jnp.asarray(sigma)


@dataclasses.dataclass(frozen=True)
class VPPrecond:
    """Variance-preserving preconditioning (Song et al. 2021; EDM Table 1, 'VP')."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    M: int = 1000
    epsilon_t: float = 1e-5
    out_channels_factor = 1

    @property
    def schedule(self) -> VPSchedule:
        """The VP noise level sigma(t) these parameters define."""
        return VPSchedule(self.beta_d, self.beta_min)

    def sigma(self, t) -> Array:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        return self.schedule.sigma(_f(t))

    def sigma_inv(self, sigma) -> Array:
        """t(sigma), the inverse of sigma(t)."""
        return self.schedule.sigma_inv(_f(sigma))

    @property
    def sigma_min(self) -> float:
        """sigma(epsilon_t), the smallest noise level trained."""
        return self.schedule.sigma_float(self.epsilon_t)

    @property
    def sigma_max(self) -> float:
        """sigma(1)."""
        return self.schedule.sigma_float(1.0)

    def scalings(self, sigma) -> Scalings:
        """c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s)."""
        s = _f(sigma)
        one = jnp.ones_like(s)
        return Scalings(one, -s, 1 / jnp.sqrt(s**2 + 1), (self.M - 1) * self.sigma_inv(s))

    def round_sigma(self, sigma) -> Array:
        """Identity."""
        return jnp.asarray(sigma)


@dataclasses.dataclass(frozen=True)
class VEPrecond:
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1, 'VE')."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    out_channels_factor = 1

    def scalings(self, sigma) -> Scalings:
        """c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""
        s = _f(sigma)
        one = jnp.ones_like(s)
        return Scalings(one, s, one, jnp.log(0.5 * s))

    def round_sigma(self, sigma) -> Array:
        """Identity."""
        return jnp.asarray(sigma)


@dataclasses.dataclass(frozen=True)
class IDDPMPrecond:
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021; EDM Table 1, 'iDDPM').

    The network outputs 2C channels (mean and variance); the first C are used.
    """

    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    out_channels_factor = 2

    @property
    def u(self) -> np.ndarray:
        """The discrete noise levels u_0 > ... > u_M = 0, float64 [M+1]."""
        return iddpm_u_table(self.M, self.C_1, self.C_2)

    @property
    def sigma_min(self) -> float:
        """u_{M-1}."""
        return float(np.float32(self.u[self.M - 1]))

    @property
    def sigma_max(self) -> float:
        """u_0."""
        return float(np.float32(self.u[0]))

    def round_index(self, sigma) -> Array:
        """Index j of the u_j nearest to sigma."""
        s = _f(sigma)
        u = jnp.asarray(self.u, s.dtype)
        return jnp.argmin(jnp.abs(s[..., None] - u), axis=-1)

    def round_sigma(self, sigma) -> Array:
        """The u_j nearest to sigma."""
        s = _f(sigma)
        return jnp.asarray(self.u, s.dtype)[self.round_index(s)]

    def scalings(self, sigma) -> Scalings:
        """c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = M - 1 - argmin_j |u_j - s|."""
        s = _f(sigma)
        one = jnp.ones_like(s)
        c_noise = (self.M - 1 - self.round_index(s)).astype(s.dtype)
        return Scalings(one, -s, 1 / jnp.sqrt(s**2 + 1), c_noise)


Precond = EDMPrecond | VPPrecond | VEPrecond | IDDPMPrecond

PRECONDS: dict[str, type] = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "iddpm": IDDPMPrecond,
}


def get_precond(name: str, **kwargs) -> Precond:
    """The preconditioning `name` ('edm', 'vp', 've', 'iddpm') with its parameters."""
    check_choice("preconditioning", name, PRECONDS)
    cls = PRECONDS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown {name} preconditioning options {unknown}; valid: {sorted(fields)}"
        )
    return cls(**kwargs)


def make_denoiser(apply_fn: Callable[..., Array], precond: Precond) -> Callable[..., Array]:
    """Wrap a raw network F into D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7).

    ``apply_fn(params, x_in, c_noise, **cond) -> F_x`` with x_in [B, ...] and c_noise [B];
    the result is ``denoise(params, x, sigma, **cond)``, computed in float32 (float64 with
    x64) whatever dtype the network runs in.
    """

    def denoise(params: Any, x: Array, sigma, **cond) -> Array:
        x = _f(x)
        sigma = jnp.broadcast_to(_f(sigma), x.shape[:1])  # [B]
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in precond.scalings(sigma))
        F_x = apply_fn(params, c_in * x, c_noise.reshape(-1), **cond)
        F_x = F_x[..., : x.shape[-1]].astype(x.dtype)  # iDDPM: first C of 2C channels
        return c_skip * x + c_out * F_x

    return denoise
