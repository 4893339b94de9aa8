"""Sample-quality metrics: FID / KID / IS (Inception-v3) and FD-DINOv2, as NVlabs/edm and edm2.

Kept light: importing ``edm_jax.metrics`` loads no network. The feature networks live in
``edm_jax.metrics.detectors`` (``load_detector``, ``random_detector``, ``DETECTORS``).
"""

from __future__ import annotations

DETECTOR_NAMES = ("inception", "dinov2")

__all__ = ["DETECTOR_NAMES"]
