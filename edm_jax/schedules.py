"""Noise-level schedules: inference sigma grids and training sigma densities.

Inference grids return ``n + 1`` values ending in 0, exactly as k-diffusion's
``get_sigmas_*``; the EDM paper's time discretizations (Table 1) are ``edm``, ``vp``,
``ve`` and ``iddpm``. Training densities take ``rng`` first and return sigmas of
``shape``. Everything is jittable (``n`` and ``shape`` static).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.checks import check_choice, check_positive, check_range, check_steps, concrete

Array = jax.Array


# --------------------------------------------------------------------------- checks


def float_dtype():
    """float64 when x64 is on, else float32: the dtype of schedules, losses and precond."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _append_zero(sigmas: Array) -> Array:
    return jnp.concatenate([sigmas, jnp.zeros([1], sigmas.dtype)])


def _ramp(n: int, start: float = 0.0, stop: float = 1.0) -> Array:
    return jnp.linspace(start, stop, n, dtype=float_dtype())


# --------------------------------------------------------------------------- inference grids


def karras(n: int, sigma_min, sigma_max, rho=7.0) -> Array:
    """Karras et al. (2022) schedule, EDM eq. 5: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    check_positive("rho", rho)
    min_inv_rho = jnp.asarray(sigma_min, float_dtype()) ** (1 / rho)
    max_inv_rho = jnp.asarray(sigma_max, float_dtype()) ** (1 / rho)
    return _append_zero((max_inv_rho + _ramp(n) * (min_inv_rho - max_inv_rho)) ** rho)


def edm(n: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> Array:
    """EDM time discretization (Table 1, 'Ours'): the Karras schedule with EDM's defaults."""
    return karras(n, sigma_min, sigma_max, rho)


def exponential(n: int, sigma_min, sigma_max) -> Array:
    """Exponential schedule: sigmas evenly spaced in log sigma."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    log_max = jnp.log(jnp.asarray(sigma_max, float_dtype()))
    log_min = jnp.log(jnp.asarray(sigma_min, float_dtype()))
    return _append_zero(jnp.exp(log_max + _ramp(n) * (log_min - log_max)))


def polyexponential(n: int, sigma_min, sigma_max, rho=1.0) -> Array:
    """Polynomial in log sigma: exp(ramp^rho (log max - log min) + log min), ramp 1 -> 0."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    check_positive("rho", rho)
    log_max = jnp.log(jnp.asarray(sigma_max, float_dtype()))
    log_min = jnp.log(jnp.asarray(sigma_min, float_dtype()))
    ramp = _ramp(n, 1.0, 0.0) ** rho
    return _append_zero(jnp.exp(ramp * (log_max - log_min) + log_min))


# --------------------------------------------------------------------------- the VP schedule

VP_BETA_D, VP_BETA_MIN = 19.9, 0.1  # Song et al. (2021) VP SDE, EDM Table 1


@dataclasses.dataclass(frozen=True)
class VPSchedule:
    """The VP noise level of EDM Table 1: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).

    The one home of the VP maths: the VP preconditioning, the VP training density, the
    ``vp`` grid and the ablation sampler all use it. Array methods keep t's dtype.
    """

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN

    def sigma(self, t) -> Array:
        """sigma(t) (EDM Table 1, VP)."""
        t = jnp.asarray(t)
        return jnp.sqrt(jnp.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

    def sigma_deriv(self, t) -> Array:
        """d sigma / dt = (beta_min + beta_d t) (sigma + 1/sigma) / 2."""
        s = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * jnp.asarray(t)) * (s + 1 / s)

    def sigma_inv(self, sigma) -> Array:
        """t(sigma), the inverse of sigma(t): (sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d."""
        s = jnp.asarray(sigma)
        root = jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log1p(s**2))
        return (root - self.beta_min) / self.beta_d

    def sigma_float(self, t: float) -> float:
        """sigma(t) of a Python float, in float64."""
        return math.sqrt(math.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    @classmethod
    def from_range(cls, sigma_min, sigma_max, epsilon: float = 1e-3) -> VPSchedule:
        """The VP schedule with sigma(epsilon) = sigma_min and sigma(1) = sigma_max."""
        return cls(*vp_betas(sigma_min, sigma_max, epsilon))


VP = VPSchedule()


def vp_betas(sigma_min, sigma_max, eps_s=1e-3) -> tuple:
    """(beta_d, beta_min) putting sigma(eps_s) = sigma_min and sigma(1) = sigma_max.

    Python floats (float64, as NVlabs/edm) for concrete limits, arrays for traced ones.
    """
    lo, hi = concrete(sigma_min), concrete(sigma_max)
    log_min: float | Array
    log_max: float | Array
    if lo is not None and hi is not None:
        log_min, log_max = math.log(lo**2 + 1), math.log(hi**2 + 1)
    else:
        log_min = jnp.log(jnp.asarray(sigma_min, float_dtype()) ** 2 + 1)
        log_max = jnp.log(jnp.asarray(sigma_max, float_dtype()) ** 2 + 1)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    return beta_d, beta_min


def vp(
    n: int, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, eps_s=1e-3, *, sigma_min=None, sigma_max=None
) -> Array:
    """Continuous VP schedule, t evenly spaced from 1 to eps_s (k-diffusion get_sigmas_vp).

    With ``sigma_min``/``sigma_max`` given, beta_d and beta_min are derived from them as in
    EDM's VP time discretization (Table 1 / the ablation sampler).
    """
    check_steps(n)
    check_positive("eps_s", eps_s)
    if (sigma_min is None) != (sigma_max is None):
        raise ValueError("vp: give both sigma_min and sigma_max, or neither")
    if sigma_min is not None:
        check_range(sigma_min, sigma_max)
        schedule = VPSchedule.from_range(sigma_min, sigma_max, eps_s)
    else:
        check_positive("beta_d", beta_d)
        check_positive("beta_min", beta_min, allow_zero=True)
        schedule = VPSchedule(beta_d, beta_min)
    return _append_zero(schedule.sigma(_ramp(n, 1.0, eps_s)))


def ve(n: int, sigma_min=0.02, sigma_max=100.0) -> Array:
    """VE time discretization (EDM Table 1): t_i = max^2 (min^2/max^2)^(i/(n-1)), sigma = sqrt(t)."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    smin = jnp.asarray(sigma_min, float_dtype())
    smax = jnp.asarray(sigma_max, float_dtype())
    t = smax**2 * (smin**2 / smax**2) ** _ramp(n)
    return _append_zero(jnp.sqrt(t))


def linear(n: int, sigma_min, sigma_max) -> Array:
    """Sigmas evenly spaced from sigma_max down to sigma_min."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    smin = jnp.asarray(sigma_min, float_dtype())
    smax = jnp.asarray(sigma_max, float_dtype())
    return _append_zero(smax + _ramp(n) * (smin - smax))


@functools.lru_cache(maxsize=16)
def iddpm_u_table(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> np.ndarray:
    """iDDPM noise levels u_0 > ... > u_M = 0 by EDM's recursion (Table 1, eq. in App. C.3.4).

    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1),
    alpha_bar(j) = sin(pi/2 * j / (M (C_2 + 1)))^2. Float64 numpy [M + 1].
    """
    if not isinstance(M, (int, np.integer)) or M < 1:
        raise ValueError(f"M must be an int >= 1, got {M!r}")
    check_positive("C_1", C_1)
    j = np.arange(M + 1, dtype=np.float64)
    alpha_bar = np.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1, dtype=np.float64)
    for k in range(M, 0, -1):  # table construction, not a sampler loop
        ratio = max(alpha_bar[k - 1] / alpha_bar[k], C_1)
        u[k - 1] = math.sqrt((u[k] ** 2 + 1) / ratio - 1)
    return u


def iddpm(n: int, sigma_min=0.002, sigma_max=81.0, C_1=0.001, C_2=0.008, M=1000) -> Array:
    """iDDPM time discretization (EDM Table 1): n of the u_j in [min, max], evenly by index."""
    check_steps(n)
    check_range(sigma_min, sigma_max)
    u = jnp.asarray(iddpm_u_table(M, C_1, C_2), float_dtype())
    inside = (u >= sigma_min) & (u <= sigma_max)
    first = jnp.argmax(inside)  # u decreases, so the kept u_j are contiguous
    count = jnp.sum(inside)
    step = (count - 1) / max(n - 1, 1)
    idx = first + jnp.round(step * jnp.arange(n, dtype=float_dtype())).astype(jnp.int32)
    return _append_zero(u[idx])


SCHEDULES: dict[str, Callable[..., Array]] = {
    "karras": karras,
    "edm": edm,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "vp": vp,
    "ve": ve,
    "iddpm": iddpm,
    "linear": linear,
}


def get_sigmas(name: str, n: int, **kwargs) -> Array:
    """The inference grid `name` with n steps (n + 1 values, the last 0)."""
    check_choice("schedule", name, SCHEDULES)
    return SCHEDULES[name](n, **kwargs)


# --------------------------------------------------------------------------- training densities

Shape = Sequence[int]


def _uniform(rng, shape, lo=0.0, hi=1.0):
    return jax.random.uniform(rng, tuple(shape), float_dtype(), lo, hi)


def stratified_uniform(u: Array, group: int = 0, groups: int = 1) -> Array:
    """k-diffusion's stratified draw over the last axis: (arange(group, n, groups) + u) / n with
    n = u.shape[-1] * groups (``K.utils.stratified_uniform``; one process: group 0 of 1)."""
    n = u.shape[-1] * groups
    return (jnp.arange(group, n, groups, dtype=u.dtype) + u) / n


def _cast(x: Array) -> Array:
    return jnp.asarray(x, float_dtype())


# Each density of k-diffusion's K.utils.rand_* as the map of its uniform draw u in [0, 1)
# (the inverse CDF); the rng forms below draw u and apply it, so the two never differ.


def lognormal_icdf(u: Array, P_mean=-1.2, P_std=1.2) -> Array:
    """ln(sigma) = Normal(P_mean, P_std).icdf(u (1 - 2e-7) + 1e-7) (K.utils.rand_log_normal)."""
    u = _cast(u) * (1 - 2e-7) + 1e-7
    return jnp.exp(P_mean + P_std * math.sqrt(2) * jax.scipy.special.erfinv(2 * u - 1))


def loglogistic_icdf(u: Array, loc=0.0, scale=1.0, min_value=0.0, max_value=math.inf) -> Array:
    """ln(sigma) ~ Logistic(loc, scale) truncated to [min_value, max_value]."""
    cdf = lambda v: jax.nn.sigmoid((jnp.log(jnp.asarray(v, float_dtype())) - loc) / scale)  # noqa: E731
    u = _cast(u) * (cdf(max_value) - cdf(min_value)) + cdf(min_value)
    return jnp.exp(jax.scipy.special.logit(u) * scale + loc)


def loguniform_icdf(u: Array, min_value, max_value) -> Array:
    """ln(sigma) ~ U(ln min_value, ln max_value)."""
    lo, hi = math.log(min_value), math.log(max_value)
    return jnp.exp(_cast(u) * (hi - lo) + lo)


def v_diffusion_icdf(u: Array, sigma_data=1.0, min_value=0.0, max_value=math.inf) -> Array:
    """Cosine (v-diffusion) density: atan(sigma/sigma_data) ~ U, truncated to [min, max]."""
    min_cdf = math.atan(min_value / sigma_data) * 2 / math.pi
    max_cdf = math.atan(max_value / sigma_data) * 2 / math.pi
    return jnp.tan((_cast(u) * (max_cdf - min_cdf) + min_cdf) * math.pi / 2) * sigma_data


def split_lognormal_from(n: Array, u: Array, loc=0.0, scale_1=1.0, scale_2=1.0) -> Array:
    """Split lognormal from |N| draws n and uniforms u (K.utils.rand_split_log_normal)."""
    n = jnp.abs(_cast(n))
    left = _cast(u) < scale_1 / (scale_1 + scale_2)
    return jnp.exp(jnp.where(left, loc - n * scale_1, loc + n * scale_2))


def _logsnr_cosine(t, logsnr_min, logsnr_max):
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


def cosine_interpolated_icdf(u: Array, image_d, noise_d_low, noise_d_high, sigma_data=1.0,
                             min_value=1e-3, max_value=1e3) -> Array:  # fmt: skip
    """Simple-diffusion's shifted cosine log-SNR, interpolated between two noise_d's in t = u."""
    logsnr_min = -2 * math.log(min_value / sigma_data)
    logsnr_max = -2 * math.log(max_value / sigma_data)

    def shifted(t, noise_d):
        shift = 2 * math.log(noise_d / image_d)
        return _logsnr_cosine(t, logsnr_min - shift, logsnr_max - shift) + shift

    t = _cast(u)
    logsnr = (1 - t) * shifted(t, noise_d_low) + t * shifted(t, noise_d_high)
    return jnp.exp(-logsnr / 2) * sigma_data


def vp_uniform_icdf(u: Array, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, epsilon_t=1e-5) -> Array:
    """VP loss density: sigma(t) with t = 1 + u (epsilon_t - 1) (NVlabs/edm VPLoss)."""
    return VPSchedule(beta_d, beta_min).sigma(1 + _cast(u) * (epsilon_t - 1))


def ve_uniform_icdf(u: Array, sigma_min=0.02, sigma_max=100.0) -> Array:
    """VE loss density: sigma = min (max/min)^u (NVlabs/edm VELoss)."""
    return sigma_min * (sigma_max / sigma_min) ** _cast(u)


def lognormal(rng: Array, shape: Shape, P_mean=-1.2, P_std=1.2) -> Array:
    """EDM training density: ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1: a normal draw)."""
    check_positive("P_std", P_std)
    return jnp.exp(P_mean + P_std * jax.random.normal(rng, tuple(shape), float_dtype()))


def loglogistic(
    rng: Array, shape: Shape, loc=0.0, scale=1.0, min_value=0.0, max_value=math.inf
) -> Array:
    """ln(sigma) ~ Logistic(loc, scale), optionally truncated to [min_value, max_value]."""
    check_positive("scale", scale)
    check_positive("min_value", min_value, allow_zero=True)
    return loglogistic_icdf(_uniform(rng, shape), loc, scale, min_value, max_value)


def loguniform(rng: Array, shape: Shape, min_value, max_value) -> Array:
    """ln(sigma) ~ U(ln min_value, ln max_value)."""
    check_range(min_value, max_value, ("min_value", "max_value"))
    return loguniform_icdf(_uniform(rng, shape), min_value, max_value)


def v_diffusion(
    rng: Array, shape: Shape, sigma_data=1.0, min_value=0.0, max_value=math.inf
) -> Array:
    """Cosine (v-diffusion) density: atan(sigma/sigma_data) ~ U, truncated to [min, max]."""
    check_positive("sigma_data", sigma_data)
    return v_diffusion_icdf(_uniform(rng, shape), sigma_data, min_value, max_value)


def split_lognormal(rng: Array, shape: Shape, loc=0.0, scale_1=1.0, scale_2=1.0) -> Array:
    """Split lognormal: ln(sigma) - loc is -|N| scale_1 w.p. s1/(s1+s2), else +|N| scale_2."""
    check_positive("scale_1", scale_1)
    check_positive("scale_2", scale_2)
    k_n, k_u = jax.random.split(rng)
    n = jax.random.normal(k_n, tuple(shape), float_dtype())
    return split_lognormal_from(n, _uniform(k_u, shape), loc, scale_1, scale_2)


def cosine_interpolated(
    rng: Array,
    shape: Shape,
    image_d,
    noise_d_low,
    noise_d_high,
    sigma_data=1.0,
    min_value=1e-3,
    max_value=1e3,
) -> Array:
    """Simple-diffusion's shifted cosine log-SNR, interpolated between two noise_d's in t."""
    check_range(min_value, max_value, ("min_value", "max_value"))
    for name, v in (
        ("image_d", image_d),
        ("noise_d_low", noise_d_low),
        ("noise_d_high", noise_d_high),
    ):
        check_positive(name, v)
    return cosine_interpolated_icdf(
        _uniform(rng, shape), image_d, noise_d_low, noise_d_high, sigma_data, min_value, max_value
    )


def vp_uniform(
    rng: Array, shape: Shape, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, epsilon_t=1e-5
) -> Array:
    """VP loss density: sigma(t) with t ~ U(epsilon_t, 1) (NVlabs/edm VPLoss)."""
    check_positive("epsilon_t", epsilon_t)
    return vp_uniform_icdf(_uniform(rng, shape), beta_d, beta_min, epsilon_t)


def ve_uniform(rng: Array, shape: Shape, sigma_min=0.02, sigma_max=100.0) -> Array:
    """VE loss density: sigma = min (max/min)^u, u ~ U(0, 1) (NVlabs/edm VELoss)."""
    check_range(sigma_min, sigma_max)
    return ve_uniform_icdf(_uniform(rng, shape), sigma_min, sigma_max)


DENSITIES: dict[str, Callable[..., Array]] = {
    "lognormal": lognormal,
    "loglogistic": loglogistic,
    "loguniform": loguniform,
    "v_diffusion": v_diffusion,
    "split_lognormal": split_lognormal,
    "cosine_interpolated": cosine_interpolated,
    "vp_uniform": vp_uniform,
    "ve_uniform": ve_uniform,
}


# The densities as maps of one uniform draw (all but split_lognormal, which k-diffusion draws
# without stratification): what ``stratified=True`` applies to stratified uniforms.
ICDFS: dict[str, Callable[..., Array]] = {
    "lognormal": lognormal_icdf,
    "loglogistic": loglogistic_icdf,
    "loguniform": loguniform_icdf,
    "v_diffusion": v_diffusion_icdf,
    "cosine_interpolated": cosine_interpolated_icdf,
    "vp_uniform": vp_uniform_icdf,
    "ve_uniform": ve_uniform_icdf,
}


def sample_sigmas(name: str, rng: Array, shape: Shape, stratified: bool = False, **kwargs) -> Array:
    """Draw training sigmas from the density `name`.

    ``stratified``: k-diffusion's training draw (one process), u = (arange(B) + U) / B over
    the last axis mapped through the density's inverse CDF (split_lognormal is drawn as
    without, as k-diffusion does). Options are checked as by the rng forms.
    """
    check_choice("sigma density", name, DENSITIES)
    if not stratified or name not in ICDFS:
        return DENSITIES[name](rng, shape, **kwargs)
    jax.eval_shape(lambda: DENSITIES[name](rng, shape, **kwargs))  # the same option checks
    return ICDFS[name](stratified_uniform(_uniform(rng, shape)), **kwargs)
