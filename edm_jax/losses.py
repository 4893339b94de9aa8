"""Denoising score-matching losses: one loss = a sigma density x a weighting (EDM eq. 2).

sigma ~ p_train (a density of ``schedules.DENSITIES``), n ~ N(0, sigma^2 I), and
loss = E[lambda(sigma) |D(y + n; sigma) - y|^2] (a weighting of ``WEIGHTINGS``), averaged
over pixels and batch: k-diffusion's split. NVlabs/edm's EDM, VP and VE losses (EDM
Table 1) are presets of it: ``edm_loss``, ``vp_loss``, ``ve_loss``. Every loss is a pure
function ``loss(rng, params, batch, *, denoise, ...) -> (loss, aux)`` with
``denoise(params, x, sigma, **cond)`` from ``make_denoiser`` and ``batch`` =
{'image': [B, H, W, C], optional 'label', optional 'augment_labels'}.

Learned uncertainty (EDM2, Karras et al. 2024, eq. 21): with ``uncertainty=True`` the
denoiser returns ``(D, logvar)`` with logvar [B] and the per-example loss is
lambda / exp(logvar) |D - y|^2 + logvar.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from edm_jax import schedules
from edm_jax.checks import check_choice
from edm_jax.samplers.core import append_dims

Array = jax.Array
Weighting = str | Callable[[Array], Array]

# lambda(sigma) on |D - y|^2 for k-diffusion's weightings. k-diffusion weights the F-space
# error |F - target|^2 = |D - y|^2 / c_out^2 by w(sigma), so lambda = w / c_out^2 with EDM's
# c_out: 'karras' (w = 1) is EDM's (sigma^2 + sd^2)/(sigma sd)^2, 'snr' is 1/sigma^2 (the
# VP/VE losses' weighting), 'soft-min-snr' is 1/(sigma^2 + sd^2).
WEIGHTINGS: dict[str, Callable[[Array, float], Array]] = {
    "karras": lambda s, sd: (s**2 + sd**2) / (s**2 * sd**2),
    "edm": lambda s, sd: (s**2 + sd**2) / (s**2 * sd**2),
    "snr": lambda s, sd: 1 / s**2,
    "soft-min-snr": lambda s, sd: 1 / (s**2 + sd**2),
}


def weight(weighting: Weighting, sigma: Array, sigma_data: float = 0.5) -> Array:
    """lambda(sigma) for a weighting name of WEIGHTINGS, or a callable sigma -> lambda."""
    if callable(weighting):
        return weighting(sigma)
    check_choice("loss weighting", weighting, WEIGHTINGS)
    return WEIGHTINGS[weighting](sigma, sigma_data)


# --------------------------------------------------------------------------- the one loss


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A resolved loss: the sigma density with its options, the weighting, sigma_data.

    ``uncertainty=True`` is EDM2's learned-uncertainty form (the denoiser returns (D, logvar)).
    """

    density: str = "lognormal"
    density_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weighting: Weighting = "karras"
    sigma_data: float = 0.5
    uncertainty: bool = False
    stratified: bool = False  # k-diffusion: u = (arange(B) + U) / B through the density's icdf

    def __post_init__(self):
        check_choice("loss density", self.density, schedules.DENSITIES)
        if not callable(self.weighting):
            check_choice("loss weighting", self.weighting, WEIGHTINGS)
        check_density_options(self.density, self.density_kwargs)


def density_options(density: str) -> dict[str, Any]:
    """The options of a density of schedules.DENSITIES: name -> default (inspect.Parameter.empty if required)."""
    check_choice("loss density", density, schedules.DENSITIES)
    params = inspect.signature(schedules.DENSITIES[density]).parameters
    return {k: p.default for k, p in params.items() if k not in ("rng", "shape")}


def check_density_options(density: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming unknown or missing options of the density (with the valid ones)."""
    valid = density_options(density)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for loss density {density!r}; valid: {sorted(valid)}"
        )
    required = {k for k, v in valid.items() if v is inspect.Parameter.empty}
    missing = sorted(required - set(options))
    if missing:
        raise ValueError(f"loss density {density!r} needs the options {missing}")


def _cond(batch: dict) -> dict:
    """Conditioning keyword arguments for the denoiser from a batch."""
    cond = {}
    if batch.get("label") is not None:
        cond["labels"] = batch["label"]
    if batch.get("augment_labels") is not None:
        cond["augment_labels"] = batch["augment_labels"]
    return cond


def denoising_loss(
    rng: Array,
    params: Any,
    batch: dict,
    sigma: Array,
    lam: Array,
    *,
    denoise: Callable,
    uncertainty: bool = False,
) -> tuple[Array, dict]:
    """E[lambda |D(y + sigma n; sigma) - y|^2] for given per-example sigma [B] and lambda [B].

    With ``uncertainty`` the denoiser returns (D, logvar [B]) and the per-example loss is
    lambda / exp(logvar) |D - y|^2 + logvar (EDM2 eq. 21).
    """
    y = batch["image"].astype(schedules.float_dtype())  # [B,H,W,C]
    n = jax.random.normal(rng, y.shape, y.dtype) * append_dims(sigma, y.ndim)
    out = denoise(params, y + n, sigma, **_cond(batch))
    D_yn, logvar = out if uncertainty else (out, None)
    mse = jnp.mean((D_yn - y) ** 2, axis=tuple(range(1, y.ndim)))  # [B]
    if logvar is None:
        per_example = lam * mse
    else:
        logvar = logvar.reshape(-1).astype(mse.dtype)  # [B]
        per_example = lam * jnp.exp(-logvar) * mse + logvar
    aux = {"per_example": per_example, "sigma": sigma}
    if logvar is not None:
        aux["logvar"] = logvar
    return jnp.mean(per_example), aux


def diffusion_loss(
    rng: Array, params: Any, batch: dict, *, denoise: Callable, spec: LossSpec = LossSpec()
) -> tuple[Array, dict]:
    """The denoising loss of `spec`: sigma from its density, lambda from its weighting."""
    k_sigma, k_noise = jax.random.split(rng)
    shape = batch["image"].shape[:1]
    sigma = schedules.sample_sigmas(
        spec.density, k_sigma, shape, stratified=spec.stratified, **spec.density_kwargs
    )
    lam = weight(spec.weighting, sigma, spec.sigma_data)
    return denoising_loss(
        k_noise, params, batch, sigma, lam, denoise=denoise, uncertainty=spec.uncertainty
    )


# --------------------------------------------------------------------------- NVlabs/edm's presets


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
    density_kwargs = {"P_mean": P_mean, "P_std": P_std}
    spec = LossSpec("lognormal", density_kwargs, weighting, sigma_data)
    return diffusion_loss(rng, params, batch, denoise=denoise, spec=spec)


def vp_loss(
    rng: Array,
    params: Any,
    batch: dict,
    *,
    denoise: Callable,
    beta_d: float = schedules.VP_BETA_D,
    beta_min: float = schedules.VP_BETA_MIN,
    epsilon_t: float = 1e-5,
    weighting: Weighting = "snr",
    sigma_data: float = 0.5,
) -> tuple[Array, dict]:
    """VP loss: sigma = sigma(t), t ~ U(epsilon_t, 1), lambda = 1/sigma^2."""
    density_kwargs = {"beta_d": beta_d, "beta_min": beta_min, "epsilon_t": epsilon_t}
    spec = LossSpec("vp_uniform", density_kwargs, weighting, sigma_data)
    return diffusion_loss(rng, params, batch, denoise=denoise, spec=spec)


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
    density_kwargs = {"sigma_min": sigma_min, "sigma_max": sigma_max}
    spec = LossSpec("ve_uniform", density_kwargs, weighting, sigma_data)
    return diffusion_loss(rng, params, batch, denoise=denoise, spec=spec)


# Each preset's density and weighting; its options are the density's (their defaults too).
PRESETS: dict[str, tuple[str, str]] = {
    "edm": ("lognormal", "karras"),
    "vp": ("vp_uniform", "snr"),
    "ve": ("ve_uniform", "snr"),
}


LOSS_OPTIONS = ("sigma_data", "stratified", "uncertainty", "weighting")  # besides the density's


def resolve_loss(
    name: str = "edm",
    *,
    density: str | None = None,
    weighting: Weighting | None = None,
    **options: Any,
) -> LossSpec:
    """The LossSpec of preset `name`, its density and/or weighting replaced when given.

    ``options`` are the density's parameters plus ``sigma_data`` (given to the density too
    when it takes one), ``uncertainty`` and (as the presets take it) ``weighting``. Bad
    names or options raise one ValueError.
    """
    check_choice("loss", name, PRESETS)
    preset_density, preset_weighting = PRESETS[name]
    density = density or preset_density
    options = dict(options)
    unknown = sorted(set(options) - set(density_options(density)) - set(LOSS_OPTIONS))
    if unknown:
        valid = sorted([*density_options(density), *LOSS_OPTIONS])
        raise ValueError(f"unknown options {unknown} for loss density {density!r}; valid: {valid}")
    weighting = options.pop("weighting", None) if weighting is None else weighting
    sigma_data = options.pop("sigma_data", 0.5)
    uncertainty = bool(options.pop("uncertainty", False))
    stratified = bool(options.pop("stratified", False))
    if "sigma_data" in density_options(density):  # v_diffusion, cosine_interpolated: the same sd
        options["sigma_data"] = sigma_data
    return LossSpec(
        density=density,
        density_kwargs=options,
        weighting=weighting or preset_weighting,
        sigma_data=sigma_data,
        uncertainty=uncertainty,
        stratified=stratified,
    )


def from_config(loss: Mapping[str, Any]) -> LossSpec | EDM2LossSpec:
    """The loss of a config's ``loss`` section (name, density, weighting, kwargs): a LossSpec,
    or EDM2LossSpec for name 'edm2'."""
    if loss.get("name") == "edm2":
        options = dict(loss.get("kwargs") or {})
        check_edm2_options(options, loss.get("density"), loss.get("weighting"))
        return EDM2LossSpec(**options)
    return resolve_loss(
        loss.get("name", "edm"),
        density=loss.get("density") or None,
        weighting=loss.get("weighting") or None,
        **dict(loss.get("kwargs") or {}),
    )


def make_loss(
    name: str,
    denoise: Callable,
    *,
    density: str | None = None,
    weighting: Weighting | None = None,
    **options: Any,
) -> Callable[..., tuple[Array, dict]]:
    """``loss_fn(rng, params, batch)`` for preset `name` (density / weighting replaceable).

    ``name='edm2'`` is EDM2Loss (``edm2_loss``): its options are ``logvar`` (required), P_mean,
    P_std, sigma_data and the recorded draws.
    """
    if name == "edm2":
        check_edm2_options(options, density=density, weighting=weighting)
        return functools.partial(edm2_loss, denoise=denoise, **options)
    spec = resolve_loss(name, density=density, weighting=weighting, **options)
    return functools.partial(diffusion_loss, denoise=denoise, spec=spec)


EDM2_OPTIONS = ("P_mean", "P_std", "sigma_data", "logvar", "rnd_normal", "noise")


def check_edm2_options(options: Mapping[str, Any], density=None, weighting=None) -> None:
    """EDM2Loss takes no density or weighting (its own lognormal and lambda), and EDM2_OPTIONS."""
    if density or weighting:
        raise ValueError(
            f"loss 'edm2' has its own lognormal density and weighting; got density={density!r}, "
            f"weighting={weighting!r} (use loss.name='edm' with loss.kwargs.uncertainty=True)"
        )
    unknown = sorted(set(options) - set(EDM2_OPTIONS))
    if unknown:
        raise ValueError(f"unknown options {unknown} for loss 'edm2'; valid: {list(EDM2_OPTIONS)}")


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
    k_sigma, k_noise = jax.random.split(rng)
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


@dataclasses.dataclass(frozen=True)
class EDM2LossSpec:
    """EDM2Loss's settings: ln sigma ~ N(P_mean, P_std^2), the network's learned uncertainty."""

    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_data: float = 0.5


def training_loss(
    spec: LossSpec | EDM2LossSpec, rng: Array, params: Any, batch: dict, *, denoise: Callable,
    logvar: Callable | None = None,
) -> tuple[Array, dict]:  # fmt: skip
    """The one loss a training step takes: a LossSpec's density x weighting, or EDM2Loss with
    the uncertainty ``logvar(params, sigma)`` of the model's head."""
    if isinstance(spec, EDM2LossSpec):
        if logvar is None:
            raise ValueError("loss 'edm2' needs a model with a logvar head (an EDM2 network)")
        options = dataclasses.asdict(spec)
        return edm2_loss(rng, params, batch, denoise=denoise, logvar=logvar, **options)
    return diffusion_loss(rng, params, batch, denoise=denoise, spec=spec)


LOSSES: dict[str, Callable[..., tuple[Array, dict]]] = {
    "edm": edm_loss,
    "vp": vp_loss,
    "ve": ve_loss,
    "edm2": edm2_loss,  # EDM2Loss (sum over elements / batch), logvar from the network
}
