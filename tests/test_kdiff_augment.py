"""k-diffusion's KarrasAugmentationPipeline (edm_jax.data.kdiff_augment): the matrix and the
conditioning vector against a NumPy re-derivation of k_diffusion/augmentation.py, the bicubic
mirror-border warp against exact cases (and against scikit-image where it is installed), and
the draw statistics."""

from __future__ import annotations

import math
from functools import reduce

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.data import kdiff_augment as K


def _t(tx, ty):
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _s(sx, sy):
    return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], np.float64)


def _r(theta):
    return np.array([[math.cos(theta), math.sin(-theta), 0],
                     [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])  # fmt: skip


def _reference(a, size):
    """KarrasAugmentationPipeline.__call__'s matrix and cond for draws a (h, w = image.size)."""
    h, w = size
    mats = [_t(h / 2 - 0.5, w / 2 - 0.5), _s(1 - 2 * a[0], 1), _s(1, 1 - 2 * a[1]),
            _s(2 ** (0.2 * a[2]), 2 ** (0.2 * a[2])), _r(-a[3]), _r(a[4]),
            _s(2 ** (0.2 * a[5]), 2 ** (-0.2 * a[5])), _r(-a[4]),
            _t(w * a[6] / 8, h * a[7] / 8), _t(-h / 2 + 0.5, -w / 2 + 0.5)]  # fmt: skip
    cond = [a[0], a[1], a[2], math.cos(a[3]) - 1, math.sin(a[3]), a[5] * math.cos(a[4]),
            a[5] * math.sin(a[4]), a[6], a[7]]  # fmt: skip
    return reduce(np.matmul, mats), np.array(cond)


def test_matrix_and_cond_follow_the_reference():
    p = K.draw_params(jax.random.key(0), 6, 1.0)  # every transform on
    height, width = 6, 10
    mats, cond = K.augment_matrix(p, height, width), K.aug_cond(p)
    for i in range(6):
        a = [float(p[f"a{k}"][i]) for k in range(8)]
        want_mat, want_cond = _reference(a, (width, height))  # PIL's image.size = (W, H)
        np.testing.assert_allclose(mats[i], want_mat, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cond[i], want_cond, rtol=1e-5, atol=1e-6)


def _params(**values):
    return {f"a{k}": jnp.asarray([float(values.get(f"a{k}", 0.0))]) for k in range(8)}


def test_identity_flip_and_integer_shift_are_exact():
    x = jax.random.uniform(jax.random.key(1), (1, 5, 7, 2))
    ident = K.augment_matrix(_params(), 5, 7)
    np.testing.assert_allclose(ident[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(K.warp(x, ident), x, atol=1e-6)
    flip = K.augment_matrix(_params(a0=1.0), 5, 7)
    np.testing.assert_allclose(K.warp(x, flip), x[:, :, ::-1], atol=1e-6)
    yflip = K.augment_matrix(_params(a1=1.0), 5, 7)
    np.testing.assert_allclose(K.warp(x, yflip), x[:, ::-1], atol=1e-6)
    shift = jnp.asarray([[[1.0, 0, 2], [0, 1, -1], [0, 0, 1]]])  # out(r, c) = in(r + 1, c - 2)
    rows = np.array([1, 2, 3, 4, 3])  # mirror borders: 4 + 1 -> 3
    cols = np.array([2, 1, 0, 1, 2, 3, 4])  # -2 -> 2, -1 -> 1
    np.testing.assert_allclose(K.warp(x, shift), np.asarray(x)[:, rows][:, :, cols], atol=1e-6)


def test_bicubic_kernel_is_catmull_rom():
    """A half-pixel shift of a row of samples: (-f0 + 9 f1 + 9 f2 - f3) / 16 inside."""
    x = jnp.asarray([0.0, 1.0, 4.0, 9.0, 16.0, 25.0]).reshape(1, 1, 6, 1)
    half = jnp.asarray([[[1.0, 0, 0.5], [0, 1, 0], [0, 0, 1]]])  # samples at c - 0.5
    got = np.asarray(K.warp(x, half))[0, 0, :, 0]
    f = np.asarray(x).ravel()
    np.testing.assert_allclose(
        got[2:5], (-f[0:3] + 9 * f[1:4] + 9 * f[2:5] - f[3:6]) / 16, rtol=1e-6
    )


def test_draw_statistics_and_bad_probability():
    n, prob = 4096, 0.3
    p = K.draw_params(jax.random.key(2), n, prob)
    sd = math.sqrt(prob * (1 - prob) / n)
    for k in ("a2", "a3", "a4", "a6"):  # continuous draws: nonzero exactly when applied
        assert abs(float(jnp.mean(p[k] != 0)) - prob) < 5 * sd, k
    assert abs(float(jnp.mean(p["a1"] != 0)) - prob / 2) < 5 * sd  # a y-flip is 0/1
    assert abs(float(jnp.mean(p["a0"])) - 0.5) < 5 * math.sqrt(0.25 / n)  # always drawn
    assert bool(jnp.all((p["a4"] != 0) == (p["a5"] != 0)))  # one gate for the anisotropy pair
    out, cond = K.karras_augment(jax.random.key(3), jnp.zeros((2, 4, 4, 1)), 0.5)
    assert out.shape == (2, 4, 4, 1) and cond.shape == (2, 9)
    with pytest.raises(ValueError, match=r"augment_prob must be in \[0, 1\], got 1.5"):
        K.draw_params(jax.random.key(0), 2, 1.5)


def test_warp_matches_scikit_image():
    transform = pytest.importorskip("skimage.transform")
    x = np.random.default_rng(0).uniform(0, 1, (3, 9, 12, 3)).astype(np.float32)
    mats = np.asarray(K.augment_matrix(K.draw_params(jax.random.key(4), 3, 1.0), 9, 12))
    want = np.stack([transform.warp(im.astype(np.float64), transform.AffineTransform(m).inverse,
                                    order=3, mode="reflect", clip=False, preserve_range=True)
                     for im, m in zip(x, mats.astype(np.float64), strict=True)])  # fmt: skip
    np.testing.assert_allclose(K.warp(jnp.asarray(x), jnp.asarray(mats)), want, atol=2e-5)
