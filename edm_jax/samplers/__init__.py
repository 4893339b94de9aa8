"""Samplers: k-diffusion's family, NVlabs/edm's, iPNDM and UniPC, each one jitted scan.

``SAMPLERS`` maps every name (with the aliases ``heun_sde`` and ``dpm++``) to its function.
All take ``(denoise, x, sigmas, *, rng=None, noise_sampler=None, **options)`` except
``dpm_fast(denoise, x, sigma_min, sigma_max, n)`` and ``dpm_adaptive(denoise, x, sigma_min,
sigma_max)``, as in k-diffusion.
"""

from collections.abc import Callable

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

SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heun_sde": sample_heun_sde,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm++": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ipndm": sample_ipndm,
    "unipc": sample_unipc,
}

# Samplers that take (sigma_min, sigma_max, ...) instead of a sigma grid.
RANGE_SAMPLERS = ("dpm_fast", "dpm_adaptive")
# Samplers that add noise (need rng or noise_sampler).
STOCHASTIC = (
    "euler_ancestral",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "heun_sde",
)


def get_sampler(name: str) -> Callable:
    """The sampler called `name`; ValueError listing every valid name otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = [
    "RANGE_SAMPLERS",
    "SAMPLERS",
    "STOCHASTIC",
    "ablation_sampler",
    "ancestral_step",
    "brownian_noise_sampler",
    "default_noise_sampler",
    "edm_sampler",
    "get_sampler",
    "lms_coefficients",
    "to_d",
    *sorted(n for n in dir() if n.startswith("sample_")),
]
