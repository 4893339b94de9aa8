"""Samplers: k-diffusion's family, NVlabs/edm's, iPNDM and UniPC, each one jitted scan.

``SAMPLERS`` maps every name (with the aliases ``heun_sde`` and ``dpm++``) to its function.
All take ``(denoise, x, sigmas, *, rng=None, noise_sampler=None, extra_args=None,
callback=None, disable=None, **options)`` except ``dpm_fast(denoise, x, sigma_min,
sigma_max, n)`` and ``dpm_adaptive(denoise, x, sigma_min, sigma_max)``, as in k-diffusion.
``SAMPLER_INFO`` describes each: grid or range, whether it adds noise, its options.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from edm_jax.checks import did_you_mean
from edm_jax.samplers.core import ancestral_step, to_d
from edm_jax.samplers.dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from edm_jax.samplers.edm import ablation_sampler, edm_sampler, sample_heun_sde
from edm_jax.samplers.kdiffusion import (
    lms_coefficients,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from edm_jax.samplers.multistep import sample_ipndm, sample_unipc
from edm_jax.samplers.noise import brownian_noise_sampler, default_noise_sampler


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """A sampler and how to call it, so callers need no special cases by name.

    ``takes``: 'grid' -> ``fn(denoise, x, sigmas, **options)``; 'range' ->
    ``fn(denoise, x, sigma_min, sigma_max, n, **options)`` (``n`` only when ``takes_n``).
    ``options``: every option (k-diffusion's names) with its default. ``noise_option``:
    the option whose value 0 turns the noise off (None: never noisy unless it is set).
    """

    fn: Callable
    takes: str  # 'grid' or 'range'
    options: dict[str, Any]
    stochastic: bool = False  # adds noise with its default options
    noise_option: str | None = None
    takes_n: bool = False

    def adds_noise(self, options: dict[str, Any]) -> bool:
        """True if a call with these options draws noise (needs rng or noise_sampler)."""
        if self.noise_option is None:
            return False
        return options.get(self.noise_option, self.options[self.noise_option]) != 0


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}
_DPM_RANGE = {"eta": 0.0, "s_noise": 1.0}
_ADAPTIVE = {
    "order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0,
    "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0, "max_steps": 10_000,
}  # fmt: skip
_HEUN_SDE = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}


def _churned(fn, options=_CHURN) -> SamplerInfo:
    return SamplerInfo(fn, "grid", dict(options), options["s_churn"] != 0, "s_churn")


def _ancestral(fn, **extra) -> SamplerInfo:
    return SamplerInfo(fn, "grid", _ANCESTRAL | extra, True, "eta")


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "euler": _churned(sample_euler),
    "euler_ancestral": _ancestral(sample_euler_ancestral),
    "heun": _churned(sample_heun),
    "heun_sde": _churned(sample_heun_sde, _HEUN_SDE),
    "dpm_2": _churned(sample_dpm_2),
    "dpm_2_ancestral": _ancestral(sample_dpm_2_ancestral),
    "lms": SamplerInfo(sample_lms, "grid", {"order": 4}),
    "dpm_fast": SamplerInfo(sample_dpm_fast, "range", dict(_DPM_RANGE), False, "eta", True),
    "dpm_adaptive": SamplerInfo(sample_dpm_adaptive, "range", dict(_ADAPTIVE), False, "eta"),
    "dpmpp_2s_ancestral": _ancestral(sample_dpmpp_2s_ancestral),
    "dpmpp_sde": _ancestral(sample_dpmpp_sde, r=0.5),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "grid", {}),
    "dpm++": SamplerInfo(sample_dpmpp_2m, "grid", {}),
    "dpmpp_2m_sde": _ancestral(sample_dpmpp_2m_sde, solver_type="midpoint"),
    "dpmpp_3m_sde": _ancestral(sample_dpmpp_3m_sde),
    "ipndm": SamplerInfo(sample_ipndm, "grid", {"order": 4}),
    "unipc": SamplerInfo(sample_unipc, "grid", {"order": 3, "lower_order_final": True}),
}

SAMPLERS: dict[str, Callable] = {name: info.fn for name, info in SAMPLER_INFO.items()}


def canonical_name(name: str) -> str:
    """A registry name from k-diffusion's function spelling too ('sample_euler' -> 'euler')."""
    if name not in SAMPLER_INFO and name.startswith("sample_") and name[7:] in SAMPLER_INFO:
        return name[7:]
    return name


def sampler_info(name: str) -> SamplerInfo:
    """The registry entry called `name` (or 'sample_<name>'); ValueError with did-you-mean."""
    key = canonical_name(name)
    if key not in SAMPLER_INFO:
        raise ValueError(
            f"unknown sampler {name!r}{did_you_mean(name, SAMPLER_INFO)}; "
            f"valid: {sorted(SAMPLER_INFO)}"
        )
    return SAMPLER_INFO[key]


def get_sampler(name: str) -> Callable:
    """The sampler called `name`; ValueError listing every valid name otherwise."""
    return sampler_info(name).fn


__all__ = [
    "canonical_name",
    "SAMPLERS",
    "SAMPLER_INFO",
    "SamplerInfo",
    "ablation_sampler",
    "ancestral_step",
    "brownian_noise_sampler",
    "default_noise_sampler",
    "edm_sampler",
    "get_sampler",
    "sampler_info",
    "lms_coefficients",
    "to_d",
    *sorted(n for n in dir() if n.startswith("sample_")),
]
