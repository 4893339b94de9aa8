"""XLA:CPU settings for fast convolutions, applied once when edm_jax is imported.

jaxlib 0.10's CPU backend hands convolutions to YNNPACK by default; on the x86 CPUs we train
on those kernels are 2-4x slower than XLA's Eigen convolutions (weight gradients 4x), which
made the CPU train step half NVlabs' speed (benchmarks/bench_train_vs_torch.py). We keep
YNNPACK for dots and reductions and route convolutions to Eigen. Elementwise fusions stay
with XLA too: once convolutions leave YNNPACK, its elementwise fusions round float->uint8
conversions to nearest instead of truncating (the VAE decode test caught it).

XLA reads XLA_FLAGS when the first backend starts, and an unknown flag aborts the process,
so the flag is added only if: no backend is running yet, the user has not set it, jaxlib is
a version it was checked on, and EDM_JAX_XLA_CPU_DEFAULTS is not '0'.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = ",".join(f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_DOT", "REDUCE"))
CHECKED_JAXLIB = ((0, 10),)  # (major, minor) releases that know the flag
OPT_OUT = "EDM_JAX_XLA_CPU_DEFAULTS"


def _jaxlib_release() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # unknown jax internals: assume started, change nothing
        return True


def configure(
    environ: MutableMapping[str, str] | None = None,
    *,
    release: tuple[int, int] | None = None,
    started: bool | None = None,
) -> bool:
    """Add the convolution setting to XLA_FLAGS where safe; True if it was added."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if environ.get(OPT_OUT, "1") == "0" or YNN_FLAG in flags:
        return False
    release = _jaxlib_release() if release is None else release
    if release not in CHECKED_JAXLIB:
        return False
    if _backends_started() if started is None else started:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}={YNN_FUSIONS}".strip()
    return True
