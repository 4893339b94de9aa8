"""Samplers: k-diffusion's family, NVlabs/edm's, iPNDM and UniPC, each one jitted scan.

``SAMPLERS`` maps every name (with the aliases ``heun_sde`` and ``dpm++``) to its function.
All take ``(denoise, x, sigmas, *, rng=None, noise_sampler=None, extra_args=None,
callback=None, disable=None, **options)`` except ``dpm_fast(denoise, x, sigma_min,
sigma_max, n)`` and ``dpm_adaptive(denoise, x, sigma_min, sigma_max)``, as in k-diffusion.
``SAMPLER_INFO`` describes each: grid or range, whether it adds noise, its options; a grid
sampler's entry is read from the ``Declaration`` that ``declare`` made it from.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from edm_jax.checks import did_you_mean
from edm_jax.samplers.core import ancestral_step, to_d
from edm_jax.samplers.declare import CONVENTION, Declaration, declaration_of, declare
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
    options: Mapping[str, Any]
    stochastic: bool = False  # adds noise with its default options
    noise_option: str | None = None
    takes_n: bool = False

    def adds_noise(self, options: dict[str, Any]) -> bool:
        """True if a call with these options draws noise (needs rng or noise_sampler)."""
        if self.noise_option is None:
            return False
        return options.get(self.noise_option, self.options[self.noise_option]) != 0


def _declared(fn: Callable) -> SamplerInfo:
    """A grid sampler's entry, read from the Declaration it was made from (one set of defaults)."""
    d = declaration_of(fn)
    return SamplerInfo(fn, "grid", d.options, d.stochastic, d.noise_option)


def _ranged(fn: Callable, takes_n: bool = False) -> SamplerInfo:
    """dpm_fast / dpm_adaptive (a sigma range, not a grid): options read from fn's signature."""
    params = inspect.signature(fn).parameters.values()
    options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    options = {k: v for k, v in options.items() if k not in (*CONVENTION, "return_info")}
    return SamplerInfo(fn, "range", options, False, "eta", takes_n)


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "euler": _declared(sample_euler),
    "euler_ancestral": _declared(sample_euler_ancestral),
    "heun": _declared(sample_heun),
    "heun_sde": _declared(sample_heun_sde),
    "dpm_2": _declared(sample_dpm_2),
    "dpm_2_ancestral": _declared(sample_dpm_2_ancestral),
    "lms": _declared(sample_lms),
    "dpm_fast": _ranged(sample_dpm_fast, takes_n=True),
    "dpm_adaptive": _ranged(sample_dpm_adaptive),
    "dpmpp_2s_ancestral": _declared(sample_dpmpp_2s_ancestral),
    "dpmpp_sde": _declared(sample_dpmpp_sde),
    "dpmpp_2m": _declared(sample_dpmpp_2m),
    "dpm++": _declared(sample_dpmpp_2m),
    "dpmpp_2m_sde": _declared(sample_dpmpp_2m_sde),
    "dpmpp_3m_sde": _declared(sample_dpmpp_3m_sde),
    "ipndm": _declared(sample_ipndm),
    "unipc": _declared(sample_unipc),
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
    "Declaration",
    "declaration_of",
    "declare",
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
