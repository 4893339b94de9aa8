"""edm_jax: the EDM design space (Karras et al. 2022) in JAX/Flax."""

from edm_jax import analytic, losses, precond, schedules
from edm_jax.losses import LOSSES, make_loss
from edm_jax.precond import PRECONDS, get_precond, make_denoiser
from edm_jax.schedules import SCHEDULES, get_sigmas

__all__ = [
    "LOSSES",
    "PRECONDS",
    "SCHEDULES",
    "analytic",
    "get_precond",
    "get_sigmas",
    "losses",
    "make_denoiser",
    "make_loss",
    "precond",
    "schedules",
]
__version__ = "0.1.0"
