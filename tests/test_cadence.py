"""edm_jax.cadence: 'every N kimg' boundaries over integer image counts, exactly."""

import pytest

from edm_jax.cadence import crossed, interval_images, intervals_done


def test_interval_is_the_exact_decimal():
    assert interval_images(0.1) == 100 and interval_images(2.5) == 2500
    assert interval_images(8388.608) == 8 << 20  # EDM2's 8 Mi images
    assert interval_images(0.0005) * 2 == 1  # half an image
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="every_kimg must be a number > 0"):
            interval_images(bad)


def test_boundaries_are_exact():
    """100 images a step, every 0.1 kimg: each step ends on a boundary and crosses it once.
    (In floating point 3 * 100 / 1000 / 0.1 == 2.9999999999999996: step 3 was missed.)"""
    assert [intervals_done(n, 0.1) for n in (0, 99, 100, 199, 200, 299, 300)] == [
        0, 0, 1, 1, 2, 2, 3,
    ]  # fmt: skip
    assert all(crossed(s, s - 1, 100, 0.1) for s in range(1, 50))
    assert not crossed(3, 3, 100, 0.1)


def test_crossing_lies_in_the_half_open_step_range():
    """Every 1 kimg at 384 images a step: boundaries at 1000, 2000, ... images."""
    hits = [s for s in range(1, 12) if crossed(s, s - 1, 384, 1)]
    assert hits == [3, 6, 8, 11]  # 1152 > 1000, 2304 > 2000, 3072 > 3000, 4224 > 4000
    assert crossed(8, 2, 384, 1) and not crossed(7, 6, 384, 1)  # 768..3072; 2304..2688
    assert not crossed(5, 5, 200, 1) and crossed(5, 4, 200, 1)  # exactly 1000 images: step 5
