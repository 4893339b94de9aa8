"""'Every N kimg' in exact arithmetic: training grids, evaluations and EDM2 snapshots.

An interval of ``every_kimg`` thousand images is crossed by a step when a multiple of it lies
in (images seen before the step, images seen after it]. The image counts are integers and
the interval is the exact decimal the config gives (``Fraction(str(0.1)) == 1/10``), so a
boundary is never missed or doubled by float rounding (``3 * 100 / 1000 / 0.1 < 3``).
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["crossed", "interval_images", "intervals_done"]


def interval_images(every_kimg: float) -> Fraction:
    """The interval in images, exactly (0.1 kimg -> 100, 2.5 kimg -> 2500); must be > 0."""
    if isinstance(every_kimg, bool) or not every_kimg > 0:
        raise ValueError(f"every_kimg must be a number > 0, got {every_kimg!r}")
    return Fraction(str(every_kimg)) * 1000


def intervals_done(images: int, every_kimg: float) -> int:
    """How many whole intervals of every_kimg thousand images `images` images complete."""
    return int(Fraction(int(images)) // interval_images(every_kimg))


def crossed(step: int, prev_step: int, batch_size: int, every_kimg: float) -> bool:
    """True when an every_kimg boundary lies in (prev_step, step] x batch_size images."""
    return intervals_done(step * batch_size, every_kimg) != intervals_done(
        prev_step * batch_size, every_kimg
    )
