"""Neighbourhood, shifted-window and global attention against brute-force masked attention."""

import jax
import numpy as np
import pytest

from edm_jax.nets import neighborhood as na
from edm_jax.nets.neighborhood import shifted_window_masks, window_starts

# one compilation per call instead of one per op (the kernels are jitted inside the models)
neighborhood_attention = jax.jit(
    na.neighborhood_attention, static_argnames=("kernel_size", "scale", "tile")
)
shifted_window_attention = jax.jit(
    na.shifted_window_attention, static_argnames=("window_size", "shift", "scale")
)
global_attention = jax.jit(na.global_attention, static_argnames=("scale",))


def masked_attention(q, k, v, mask, scale):
    """float64 softmax attention over all H*W tokens with a [HW, HW] boolean mask."""
    B, H, W, nh, d = q.shape
    qs, ks, vs = (np.asarray(t, np.float64).reshape(B, H * W, nh, d) for t in (q, k, v))
    logits = np.einsum("bind,bjnd->bnij", qs, ks) * scale
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnij,bjnd->bind", p, vs).reshape(B, H, W, nh, d)


def natten_mask(H, W, k):
    """Query (i, j) sees rows [s_i, s_i + k) x cols [s_j, s_j + k), s = clamp(i - k//2, 0, L - k)."""
    m = np.zeros((H, W, H, W), bool)
    for i in range(H):
        si = min(max(i - k // 2, 0), H - k)
        for j in range(W):
            sj = min(max(j - k // 2, 0), W - k)
            m[i, j, si : si + k, sj : sj + k] = True
    return m.reshape(H * W, H * W)


def qkv(shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def test_window_starts_clamp_inwards():
    assert window_starts(10, 7).tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3]
    assert window_starts(6, 4).tolist() == [0, 0, 0, 1, 2, 2]  # even kernel: i - 2


@pytest.mark.parametrize(
    "H, W, k, tile, scale",
    [
        (13, 10, 4, 8, 0.7),  # odd/even sizes, even kernel, tile not dividing H
        (9, 9, 9, 4, 0.7),  # window = whole grid
        (12, 7, 3, 5, None),  # rectangular, tile dividing neither side, default 1/sqrt(d)
        (5, 11, 5, (3, 4), 0.7),  # non-square tiles
        (6, 8, 1, 16, 0.7),  # kernel 1, tile larger than the grid
    ],
)
def test_neighborhood_equals_brute_force(H, W, k, tile, scale):
    """(The 16x16, kernel 7 case of HDiT is checked through the natten model fixtures.)"""
    q, k_, v = qkv((2, H, W, 2, 8))
    out = neighborhood_attention(q, k_, v, kernel_size=k, scale=scale, tile=tile)
    ref = masked_attention(q, k_, v, natten_mask(H, W, k), 8**-0.5 if scale is None else scale)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)


def test_neighborhood_window_larger_than_grid_is_one_clear_error():
    q, k, v = qkv((1, 6, 9, 1, 4))
    with pytest.raises(ValueError, match=r"kernel_size 7 does not fit the 6x9 token grid"):
        neighborhood_attention(q, k, v, kernel_size=7)


def test_shifted_window_masks_match_reference(fixtures_dir):
    data = np.load(fixtures_dir / "kdiff_hdit.npz")
    np.testing.assert_array_equal(shifted_window_masks(4, 4, 4, 2), data["swin_mask_level0"])
    np.testing.assert_array_equal(shifted_window_masks(2, 2, 4, 2), data["swin_mask_level1"])


def swin_mask(H, W, ws, shift):
    """Full [HW, HW] mask: roll by +shift, same window, and the wrap-around side rule per axis."""
    m = np.zeros((H, W, H, W), bool)
    for a in np.ndindex(H, W):
        ra = ((a[0] + shift) % H, (a[1] + shift) % W)  # position after torch.roll(+shift)
        for b in np.ndindex(H, W):
            rb = ((b[0] + shift) % H, (b[1] + shift) % W)
            if (ra[0] // ws, ra[1] // ws) != (rb[0] // ws, rb[1] // ws):
                continue
            ok = True
            for ax in (0, 1):  # first window row/column: only tokens on the same side of shift
                if ra[ax] // ws == 0 and (ra[ax] % ws < shift) != (rb[ax] % ws < shift):
                    ok = False
            m[a + b] = ok
    return m.reshape(H * W, H * W)


@pytest.mark.parametrize("H, W, ws, shift", [(8, 12, 4, 2), (6, 9, 3, 1)])
def test_shifted_window_equals_brute_force(H, W, ws, shift):
    q, k, v = qkv((2, H, W, 2, 4), seed=2)
    out = shifted_window_attention(q, k, v, window_size=ws, shift=shift, scale=1.0)
    np.testing.assert_allclose(
        np.asarray(out), masked_attention(q, k, v, swin_mask(H, W, ws, shift), 1.0), atol=2e-6
    )


def test_shifted_window_size_must_divide_grid():
    q, k, v = qkv((1, 6, 8, 1, 4))
    with pytest.raises(ValueError, match="window_size 4 must divide the 6x8"):
        shifted_window_attention(q, k, v, window_size=4, shift=2)


def test_global_attention_equals_brute_force():
    q, k, v = qkv((2, 5, 6, 3, 4), seed=3)
    out = global_attention(q, k, v)
    ref = masked_attention(q, k, v, np.ones((30, 30), bool), 0.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)
