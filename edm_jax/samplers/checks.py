"""The sampler input checks, whose one home is ``edm_jax.checks`` (re-exported here for
callers that import them from the samplers package)."""

from edm_jax.checks import MAX_SEED, check_range, check_scalar, check_seeds, check_sigmas

__all__ = ["MAX_SEED", "check_range", "check_scalar", "check_seeds", "check_sigmas"]
