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

diffusers-style models: ``diffusers_alphas_cumprod`` builds the table from a beta schedule
(linear, scaled_linear, squaredcos_cap_v2, optionally rescaled to zero terminal SNR) and
``diffusers_sigmas`` the grid of diffusers' ``leading`` / ``trailing`` / ``linspace``
timestep spacing, both as diffusers' EulerDiscreteScheduler computes them.
``SamplingModel`` makes any such denoiser samplable by ``edm_jax.sample`` (its own sigma
range, no clipping of latent outputs).

Models from elsewhere, as k-diffusion's ``external.py``: ``OpenAIDenoiser`` (guided-diffusion,
learned-sigma output split), ``CompVisDenoiser`` / ``CompVisVDenoiser`` (latent diffusion,
Stable Diffusion), all over a float32 ``alphas_cumprod`` table with float32 sigmas as the
reference; their schedules ``guided_diffusion_alphas_cumprod`` and ``ldm_alphas_cumprod``
are built in float64 as the reference code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.samplers.core import append_dims

Array = jax.Array

__all__ = [
    "BETA_SCHEDULES",
    "GUIDED_DIFFUSION_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "CompVisDenoiser",
    "CompVisVDenoiser",
    "OpenAIDenoiser",
    "guided_diffusion_alphas_cumprod",
    "guided_diffusion_betas",
    "ldm_alphas_cumprod",
    "ldm_betas",
    "DiscreteEpsDDPMDenoiser",
    "DiscreteSchedule",
    "DiscreteVDDPMDenoiser",
    "EpsDenoiser",
    "SamplingModel",
    "VDenoiser",
    "X0Denoiser",
    "atan_sigma_to_t",
    "atan_t_to_sigma",
    "beta_schedule",
    "diffusers_alphas_cumprod",
    "diffusers_sigmas",
    "diffusers_timesteps",
    "rescale_zero_terminal_snr",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
ZERO_SNR_ALPHABAR = 2.0**-24  # diffusers: alphas_cumprod[-1] when rescaled to zero SNR


def _f(x) -> Array:
    """x as the widest enabled float (float64 with x64 on, else float32)."""
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(jnp.float64))


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
    return x, sigma, append_dims(sigma, x.ndim)


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


def _zero_snr_end(before_last: float) -> float:
    """The last alphas_cumprod of a zero-terminal-SNR table (sigma = inf there).

    2^-24 as diffusers, so the first sigma (~4096) is finite; where the table's previous
    entry is already below 2^-24 (linear betas), half of it, keeping sigma increasing.
    """
    return min(ZERO_SNR_ALPHABAR, float(before_last) / 2)


class _DiscreteTable:
    """sigma <-> t maps of a DDPM ``alphas_cumprod`` table (shared by the discrete wrappers).

    sigma_t = sqrt((1 - alphabar_t) / alphabar_t), increasing in t. Between table entries
    t is interpolated linearly in log sigma, or rounded to the nearest if ``quantize``.
    """

    alphas_cumprod: np.ndarray
    quantize: bool

    def __post_init__(self):
        ac = np.array(self.alphas_cumprod, np.float64)
        if ac.ndim == 1 and ac.size >= 2 and ac[-1] in (0, ZERO_SNR_ALPHABAR):
            ac[-1] = _zero_snr_end(ac[-2])
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

    def diffusers_sigmas(
        self, n: int, timestep_spacing: str = "linspace", steps_offset: int = 0
    ) -> np.ndarray:
        """n + 1 sigmas ending in 0 at diffusers' timesteps (see ``diffusers_sigmas``)."""
        return diffusers_sigmas(self.alphas_cumprod, n, timestep_spacing, steps_offset)


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


# --------------------------------------------------------------------------- diffusers


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit: a float32 step, each point
    start + i step (first half) or end - (n-1-i) step rounded once (as torch's fused op)."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32])
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    head = (np.float64(start32) + step * i).astype(np.float32)
    tail = (np.float64(end32) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, head, tail)


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squaredcos_cap_v2: beta_t = min(1 - abar(t+1)/abar(t), max_beta), float32."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
    return np.asarray(betas, np.float32)


def beta_schedule(
    name: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> np.ndarray:
    """betas [T] (float32) of diffusers' ``beta_schedule`` (linear, scaled_linear, cosine)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {name!r}; valid: {list(BETA_SCHEDULES)}")
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {T!r}")
    if name == "linear":
        return _linspace32(beta_start, beta_end, T)
    if name == "scaled_linear":  # latent diffusion (Stable Diffusion)
        return _linspace32(beta_start**0.5, beta_end**0.5, T) ** 2
    return _cosine_betas(T)


def _cumprod32(a: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 array on the CPU: accumulated in float64, stored float32."""
    return np.cumprod(np.asarray(a, np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """betas with sqrt(alphabar) shifted to end at 0 and scaled to keep its start (Lin et al.
    2024, Algorithm 1), computed in float32 as diffusers."""
    abar_sqrt = np.sqrt(_cumprod32(1 - np.asarray(betas, np.float32)))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).astype(np.float32)


def diffusers_alphas_cumprod(
    beta_schedule_name: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """alphas_cumprod [T] as diffusers' schedulers build it (float32; defaults: SD 1.x/2.x).

    With ``rescale_betas_zero_snr`` the table ends in 2^-24 instead of 0 (as diffusers), so
    sigma_max = sqrt((1 - 2^-24) / 2^-24) ~ 4096 is finite.
    """
    betas = beta_schedule(beta_schedule_name, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ac = _cumprod32(1 - betas)
    if rescale_betas_zero_snr:
        ac[-1] = ZERO_SNR_ALPHABAR
    return ac


def diffusers_timesteps(
    n: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
) -> np.ndarray:
    """The n timesteps [n] (float32, decreasing) of diffusers' EulerDiscreteScheduler."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; valid: {list(TIMESTEP_SPACINGS)}"
        )
    T = num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"number of steps must be an int in [1, {T}], got {n!r}")
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if timestep_spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32)
        return t + np.float32(steps_offset)
    t = np.arange(T, 0, -T / n).round().copy().astype(np.float32)  # trailing
    return t - np.float32(1)


def diffusers_sigmas(
    alphas_cumprod, n: int, timestep_spacing: str = "linspace", steps_offset: int = 0
) -> np.ndarray:
    """n + 1 sigmas [n + 1] (float32, ending in 0) at diffusers' timesteps.

    As EulerDiscreteScheduler.set_timesteps: sigma_t = sqrt((1 - abar_t) / abar_t),
    linearly interpolated at the (possibly fractional) timesteps.
    """
    ac = np.asarray(alphas_cumprod)
    t = diffusers_timesteps(n, len(ac), timestep_spacing, steps_offset)
    table = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(t, np.arange(0, len(table)), table)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


# --------------------------------------------------------------------------- edm_jax.sample


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingModel:
    """A denoiser (e.g. a wrapped eps/v model) in the form ``edm_jax.sample`` takes.

    ``denoise(params, x, sigma, labels=None)`` calls ``denoiser(x, sigma, params=params,
    labels=labels)`` (keywords left out when None). The sigma range is the denoiser's own
    (``sigma_min``/``sigma_max`` attributes, e.g. a discrete table's) unless given; outputs
    are not clipped unless ``clip_output`` (latent models produce values past [-1, 1]).
    """

    denoiser: Callable[..., Array]
    image_shape: tuple[int, ...]
    label_dim: int = 0
    clip_output: bool = False
    sigma_range: tuple[float, float] | None = None
    # types.SampleableModel: pixels or latents as the denoiser makes them, decoded by the caller
    encoder = None
    null_label = "zero"  # classifier-free guidance: a zero one-hot row is the null label
    takes_key = False

    @property
    def sigma_min(self) -> float:
        """Lowest noise level the denoiser is defined at."""
        if self.sigma_range is not None:
            return float(self.sigma_range[0])
        return float(getattr(self.denoiser, "sigma_min", 0.0))

    @property
    def sigma_max(self) -> float:
        """Highest noise level the denoiser is defined at."""
        if self.sigma_range is not None:
            return float(self.sigma_range[1])
        return float(getattr(self.denoiser, "sigma_max", math.inf))

    def round_sigma(self, sigma) -> Array:
        """Identity: sampled at the schedule's sigmas as they are."""
        return jnp.asarray(sigma)

    def denoise(self, params, x: Array, sigma, labels=None) -> Array:
        """D(x; sigma) with params and labels passed on by keyword."""
        cond = {} if params is None else {"params": params}
        if labels is not None:
            cond["labels"] = labels
        return self.denoiser(x, sigma, **cond)


# --------------------------------------------------------------------------- OpenAI / CompVis


class _Float32Sigmas:
    """k-diffusion's table over a float32 ``alphas_cumprod`` buffer: sigmas computed in float32.

    As ``external.py`` (OpenAIDenoiser casts guided-diffusion's float64 table to float32;
    LatentDiffusion keeps a float32 buffer): sigma_t = ((1 - a) / a) ** 0.5 in float32.
    """

    alphas_cumprod: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "alphas_cumprod", np.asarray(self.alphas_cumprod, np.float32))
        super().__post_init__()  # type: ignore[misc]

    @property
    def sigmas(self) -> Array:
        """sigma_t for t = 0..T-1 [T] (float32), increasing."""
        a = self.alphas_cumprod.astype(np.float32)
        return jnp.asarray(np.sqrt((1 - a) / a), jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class OpenAIDenoiser(_Float32Sigmas, DiscreteEpsDDPMDenoiser):
    """guided-diffusion's ``model(x_in, t, **cond)`` as k-diffusion's ``OpenAIDenoiser``.

    ``alphas_cumprod`` is the GaussianDiffusion's float64 table (``guided_diffusion_alphas_
    cumprod``), used in float32; t is interpolated in log sigma and clamped to [0, T-1].
    With ``has_learned_sigmas`` the output's first half of channels is eps (the rest, the
    variance interpolation, is discarded; external.py:121).
    """

    model: Callable[..., Array]
    alphas_cumprod: np.ndarray
    quantize: bool = False
    has_learned_sigmas: bool = True

    def __call__(self, x: Array, sigma, **cond) -> Array:
        """D(x; sigma) = x - sigma eps(x / sqrt(sigma^2+1), t(sigma))."""
        x, sigma, s = _vp_inputs(x, sigma)
        out = self.model(x / jnp.sqrt(s**2 + 1), self.sigma_to_t(sigma), **cond)
        C = x.shape[-1] * (2 if self.has_learned_sigmas else 1)
        if out.shape[-1] != C:
            raise ValueError(
                f"model output has {out.shape[-1]} channels, expected {C} for {x.shape[-1]}-"
                f"channel images with has_learned_sigmas={self.has_learned_sigmas}"
            )
        return _eps_to_D(x, s, out[..., : x.shape[-1]])  # learned sigma: eps = first half


@dataclasses.dataclass(frozen=True, eq=False)
class CompVisDenoiser(_Float32Sigmas, DiscreteEpsDDPMDenoiser):
    """A CompVis latent-diffusion eps model (SD 1.x) as k-diffusion's ``CompVisDenoiser``.

    ``model(x_in, t, **cond)`` plays ``apply_model`` (e.g. the U-Net with ``context=``);
    ``alphas_cumprod`` is the model's float32 buffer (``ldm_alphas_cumprod().astype(float32)``).
    """


@dataclasses.dataclass(frozen=True, eq=False)
class CompVisVDenoiser(_Float32Sigmas, DiscreteVDDPMDenoiser):
    """A CompVis latent-diffusion v model (SD 2.x 768-v) as k-diffusion's ``CompVisVDenoiser``."""


def _torch_linspace64(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float64): start + i step (first half), end - (n-1-i)
    step (second half), as torch's kernel (np.linspace differs in the last bit)."""
    step = (end - start) / (n - 1)
    i = np.arange(n)
    return np.where(i < n // 2, start + step * i, end - step * (n - 1 - i))


def ldm_betas(
    num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> np.ndarray:
    """betas [T] (float64) of CompVis ``make_beta_schedule('linear', ...)`` (SD 1.x / 2.x):
    linspace(sqrt(start), sqrt(end), T) ** 2 (ldm/modules/diffusionmodules/util.py:21)."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    return _torch_linspace64(linear_start**0.5, linear_end**0.5, num_timesteps) ** 2


def ldm_alphas_cumprod(
    num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> np.ndarray:
    """alphas_cumprod [T] (float64) of the LDM linear schedule; LatentDiffusion keeps (and
    saves) it as a float32 buffer, which is what ``CompVisDenoiser`` takes."""
    return np.cumprod(1 - ldm_betas(num_timesteps, linear_start, linear_end))


GUIDED_DIFFUSION_SCHEDULES = ("linear", "cosine")


def guided_diffusion_betas(name: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """betas [T] (float64) of guided-diffusion's ``get_named_beta_schedule``.

    linear: linspace(1e-4, 0.02) scaled by 1000 / T; cosine (iDDPM): 1 - abar(t+1)/abar(t)
    for abar(t) = cos((t + 0.008) / 1.008 pi/2)^2, clipped at 0.999.
    """
    if name not in GUIDED_DIFFUSION_SCHEDULES:
        raise ValueError(
            f"unknown guided-diffusion schedule {name!r}; valid: {list(GUIDED_DIFFUSION_SCHEDULES)}"
        )
    T = num_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {T!r}")
    if name == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])


def guided_diffusion_alphas_cumprod(name: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """alphas_cumprod [T] (float64) of a guided-diffusion ``GaussianDiffusion``."""
    return np.cumprod(1 - guided_diffusion_betas(name, num_timesteps))
