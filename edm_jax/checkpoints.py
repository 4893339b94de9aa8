"""The old name of ``edm_jax.checkpoint_reader`` (the same module object), kept for imports."""

import sys

from edm_jax import checkpoint_reader

sys.modules[__name__] = checkpoint_reader
