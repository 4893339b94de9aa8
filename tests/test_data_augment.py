"""EDM augmentation: each transform's exact effect on test images, and its augment labels."""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.data import augment, augment_dim, hflip
from edm_jax.data.augment import translate_int_pixels
from edm_jax.data.warp import SYM6, geometric_warp, rotate2d, translate2d

B, H, W = 16, 16, 16
DELTA = ((np.arange(12) * SYM6).sum() / SYM6.sum() - 5) / 2  # filter offset, input px
OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def _images(seed=0, b=B, h=H, w=W, c=3):
    """Random test images in [-1, 1], [b,h,w,c]."""
    return jax.random.uniform(jax.random.key(seed), (b, h, w, c), minval=-1, maxval=1)


def _blob(cx, cy, b=B, size=32, width=2.0):
    """Smooth Gaussian blobs centred at (cx, cy) pixels from the image centre: [b,s,s,1]."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    img = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2)).astype(np.float32)
    return jnp.asarray(np.broadcast_to(img[None, :, :, None], (b, size, size, 1)))


def _centroid(images):
    """Intensity centroid (x, y) per image, relative to the centre: [b,2]."""
    s = images.shape[1]
    y, x = np.mgrid[:s, :s] - (s - 1) / 2
    m = np.asarray(images)[..., 0]
    total = m.sum((1, 2))
    return np.stack([(m * x).sum((1, 2)) / total, (m * y).sum((1, 2)) / total], 1)


@functools.partial(jax.jit, static_argnames=("kw",))
def _aug(rng, images, p, kw):
    """jit-compiled augment with hashable static options."""
    return augment(rng, images, p=p, **dict(kw))


def _run(images, p=1.0, seed=1, **kw):
    """Augment with the given multipliers (everything else off)."""
    return _aug(jax.random.key(seed), images, p, tuple(sorted({**OFF, **kw}.items())))


def test_p0_is_identity_with_zero_labels():
    x = _images()
    out, labels = _aug(jax.random.key(0), x, jnp.float32(0.0), ())  # EDM defaults, p = 0
    np.testing.assert_array_equal(out, x)
    assert labels.shape == (B, 9) and augment_dim() == 9
    np.testing.assert_array_equal(labels, 0)


@pytest.mark.parametrize("name,axis,column", [("xflip", 2, 0), ("yflip", 1, 0)])
def test_flips_are_flips(name, axis, column):
    x = _images()
    out, labels = _run(x, **{name: 1})
    assert labels.shape == (B, 1)
    flipped = labels[:, column] == 1
    assert 0 < int(flipped.sum()) < B  # both outcomes occur
    want = jnp.where(flipped[:, None, None, None], jnp.flip(x, axis), x)
    np.testing.assert_array_equal(out, want)


def test_rotate_int_matches_its_labels():
    x = _images()
    out, labels = _run(x, rotate_int=1, seed=3)
    assert labels.shape == (B, 2)
    for i in range(B):
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[tuple(np.asarray(labels[i], int))]
        np.testing.assert_array_equal(out[i], np.rot90(np.asarray(x[i]), k=k, axes=(0, 1)))


def test_translate_int_moves_pixels_by_label():
    x = _images(c=1)
    out, labels = _run(x, translate_int=1, seed=4)
    tx = np.round(np.asarray(labels[:, 0]) * W * 0.125).astype(int)
    ty = np.round(np.asarray(labels[:, 1]) * H * 0.125).astype(int)
    assert np.abs(tx).max() > 0 and np.abs(tx).max() <= 2
    for i in range(B):
        xi = np.asarray(x[i])
        cols = np.arange(W) - tx[i]  # content moves right by tx, down by -ty
        rows = np.arange(H) + ty[i]
        cols = np.where(cols < 0, -cols, np.where(cols >= W, 2 * W - 2 - cols, cols))
        rows = np.where(rows < 0, -rows, np.where(rows >= H, 2 * H - 2 - rows, rows))
        np.testing.assert_array_equal(out[i], xi[rows][:, cols])


def test_integer_shift_helper_is_exact():
    x = jnp.arange(2 * 1 * 6 * 1, dtype=jnp.float32).reshape(2, 1, 6, 1)
    out = translate_int_pixels(x, jnp.array([2, -1]), jnp.array([0, 0]))
    np.testing.assert_array_equal(out[0, 0, :, 0], [2, 1, 0, 1, 2, 3])  # reflected at the edge
    np.testing.assert_array_equal(out[1, 0, :, 0], [7, 8, 9, 10, 11, 10])


_warp = jax.jit(geometric_warp)


def test_warp_integer_translation_is_exact_reflection():
    x = _images(b=2, h=40, w=40, c=1)
    G = jnp.stack([translate2d(-3.0, 2.0), jnp.eye(3)])  # sample 0: move right 3, up 2
    out = _warp(x, G)
    rows = np.arange(40) + 2
    rows = np.where(rows >= 40, 2 * 40 - 2 - rows, rows)
    cols = np.abs(np.arange(40) - 3)
    np.testing.assert_allclose(out[0], np.asarray(x[0])[rows][:, cols], atol=2e-5)
    np.testing.assert_array_equal(out[1], x[1])  # identity samples are untouched


def test_warp_quarter_turn_of_smooth_image():
    blob = _blob(5.0, -3.0, b=2, size=40, width=2.0)
    out = _warp(blob, jnp.stack([rotate2d(np.pi / 2), jnp.eye(3)]))
    want = np.rot90(np.asarray(blob[0]), k=1, axes=(0, 1))  # (5, -3) -> (-3, -5)
    centre = np.array([-3.0, -5.0]) + (np.array([[0, 1], [-1, 0]]) - np.eye(2)) @ [DELTA, DELTA]
    np.testing.assert_allclose(_centroid(out[:1]), centre[None], atol=0.01)
    np.testing.assert_allclose(out[0], want, atol=0.025)  # sym6 is only near-symmetric


def test_geometric_labels_encode_scale_rotation_translation():
    """Blob at c goes to s * R(-w) c + t (G_inv = S(1/s) R(w) T(-t), as the reference)."""
    c = np.array([3.0, -1.5])
    kw = dict(scale=1, rotate_frac=1, translate_frac=1, translate_frac_std=0.05)
    out, labels = _run(_blob(*c, size=40, width=1.5), p=0.7, seed=5, **kw)
    labels = np.asarray(labels)
    assert labels.shape == (B, 5)
    s = 2 ** (labels[:, 0] * 0.2)
    cos, sin = labels[:, 1] + 1, labels[:, 2]
    np.testing.assert_allclose(cos**2 + sin**2, 1, atol=1e-5)
    t = labels[:, 3:5] * 40 * 0.05
    A = s[:, None, None] * np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)
    # sym6 is not symmetric: its centroid sits DELTA px off-centre in each axis, which the
    # up/downsampling pair cancels only for A = I (the reference behaves the same).
    want = A @ c + t + (A - np.eye(2)) @ np.full(2, DELTA)
    np.testing.assert_allclose(_centroid(out), want, atol=0.01)
    for col in range(3):  # p = 0.7: each transform both applied and skipped somewhere
        assert 0 < np.count_nonzero(labels[:, col if col < 2 else 3]) < B


def test_edm_defaults_jit_with_traced_p():
    x = _images()
    out, labels = _aug(jax.random.key(8), x, jnp.float32(0.3), ())
    assert out.shape == x.shape and labels.shape == (B, 9)
    labels = np.asarray(labels)
    assert set(np.unique(labels[:, :2])) <= {0.0, 1.0}
    np.testing.assert_allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, 1, atol=1e-5)
    geometric = np.any(labels[:, 2:] != 0, axis=1)
    flips = labels[:, 0] + 2 * labels[:, 1]
    for i in np.flatnonzero(~geometric):  # flips only: exact
        xi = np.asarray(x[i])
        xi = xi[:, ::-1] if flips[i] in (1, 3) else xi
        xi = xi[::-1] if flips[i] >= 2 else xi
        np.testing.assert_array_equal(out[i], xi)
    assert 0 < geometric.sum() < B


def test_hflip():
    x = _images()
    out = hflip(jax.random.key(9), x)
    same = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
    mirrored = np.all(np.asarray(out) == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()


def _replay_jax(draws):
    """Stand-in for `jax` whose jax.random hands out recorded draws in order."""

    def take(key, shape, *bounds):
        return jnp.asarray(next(draws)).reshape(shape)

    def split(key, n=2):
        return [None] * n

    random = types.SimpleNamespace(split=split, randint=take, uniform=take, normal=take)
    return types.SimpleNamespace(random=random, Array=jax.Array)


def test_matches_nvlabs_reference_with_same_draws(fixtures_dir, monkeypatch):
    """Same random draws as NVlabs/edm AugmentPipe -> same images (1e-5) and labels.

    Fixture augment_edm.npz: the reference's inputs, outputs and every torch.rand/randn/
    randint draw in order, for EDM's CIFAR-10 setting (p=0.6, 16x20 images) and for the
    pixel blits (p=0.7). The draws are fed to our code in the reference's order.
    """
    path = fixtures_dir / "augment_edm.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    ref = np.load(path)
    module = sys.modules["edm_jax.data.augment"]
    blit = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1)
    for name, kw in (("edm", dict(p=0.6)), ("blit", dict(OFF, p=0.7, **blit))):
        draws = iter(ref[f"{name}_draw{i}"] for i in range(int(ref[f"{name}_ndraws"])))
        monkeypatch.setattr(module, "jax", _replay_jax(draws))
        out, labels = augment(None, jnp.asarray(ref[f"{name}_input"]), **kw)
        assert next(draws, None) is None  # consumed exactly the reference's draws
        np.testing.assert_allclose(out, ref[f"{name}_images"], atol=1e-5)
        np.testing.assert_allclose(labels, ref[f"{name}_labels"], atol=1e-6)
