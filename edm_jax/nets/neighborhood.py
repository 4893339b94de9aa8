"""Local 2-D attention kernels of HDiT without natten: neighbourhood and shifted-window.

``neighborhood_attention`` has natten's window rule (``get_window_start``: a query at i sees
the k keys starting at ``clamp(i - k//2, 0, L - k)``, so windows shift inwards at the borders
and are never masked; dilation 1, non-causal). It is tiled for accelerators: queries are cut
into T_h x T_w tiles, each tile attends densely to the (T_h + k - 1) x (T_w + k - 1) key band
that holds every window of the tile (gathered once per tile from static slices), and a static
per-axis mask keeps each query to its own window. Compute is (1 + (k-1)/T)^2 times the exact
k^2 per query, all as batched matmuls.

``shifted_window_attention`` is k-diffusion ``image_transformer_v2.apply_window_attention``:
roll by +shift, row-major windows, the masks of ``make_shifted_window_masks``, roll back.
Arrays are [B, H, W, heads, d]; softmax runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_TILE = 8


def window_starts(length: int, kernel_size: int) -> np.ndarray:
    """natten's window start of every position: clamp(i - k//2, 0, L - k), int [L]."""
    i = np.arange(length)
    return np.clip(i - kernel_size // 2, 0, length - kernel_size)


def _axis_plan(length: int, kernel_size: int, tile: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(band start per tile [n], mask [n, T, T_b], T) for one axis, T_b = min(L, T + k - 1)."""
    tile = min(tile, length)
    n = -(-length // tile)
    band = min(length, tile + kernel_size - 1)
    q = np.arange(n * tile).reshape(n, tile)  # padded query positions (the tail is dropped)
    start = window_starts(length, kernel_size)[np.minimum(q, length - 1)]  # [n, T]
    b0 = np.clip(start[:, 0], 0, length - band)  # [n]; every window of a tile lies in its band
    key = b0[:, None, None] + np.arange(band)  # [n, 1, T_b]
    mask = (key >= start[..., None]) & (key < start[..., None] + kernel_size)  # [n, T, T_b]
    return b0, mask, tile


def _check(h: int, w: int, kernel_size: int) -> None:
    """Raise ValueError if the window does not fit the token grid."""
    if kernel_size < 1 or kernel_size > min(h, w):
        raise ValueError(
            f"neighborhood kernel_size {kernel_size} does not fit the {h}x{w} token grid; "
            f"valid: 1 <= kernel_size <= {min(h, w)} (natten needs the window inside the grid)"
        )


def _bands(k: Array, starts: np.ndarray, band: int, axis: int) -> Array:
    """Stack the key bands [start, start + band) of `axis` into a new tile axis before it."""
    return jnp.stack([jax.lax.slice_in_dim(k, s, s + band, axis=axis) for s in starts], axis)


def _pad_to(x: Array, axis: int, size: int) -> Array:
    """Zero-pad `axis` at the end up to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def neighborhood_attention(
    q: Array,
    k: Array,
    v: Array,
    kernel_size: int,
    *,
    scale: float | None = None,
    tile: int | tuple[int, int] = DEFAULT_TILE,
) -> Array:
    """2-D neighbourhood attention with natten's clamped windows: [B,H,W,nh,d] -> [B,H,W,nh,d]."""
    B, H, W, nh, d = q.shape
    _check(H, W, kernel_size)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    bh, mh, th = _axis_plan(H, kernel_size, th)
    bw, mw, tw = _axis_plan(W, kernel_size, tw)
    nth, ntw = len(bh), len(bw)
    scale = d**-0.5 if scale is None else scale
    qt = _pad_to(_pad_to(q, 1, nth * th), 2, ntw * tw)
    qt = qt.reshape(B, nth, th, ntw, tw, nh, d)  # [B, nTh, Th, nTw, Tw, nh, d]
    kt = _bands(_bands(k, bh, mh.shape[-1], 1), bw, mw.shape[-1], 3)  # [B,nTh,Tbh,nTw,Tbw,nh,d]
    vt = _bands(_bands(v, bh, mh.shape[-1], 1), bw, mw.shape[-1], 3)
    logits = jnp.einsum("bxiyjnd,bxkylnd->bxynijkl", qt, kt, preferred_element_type=jnp.float32)
    mask = mh[:, None, None, :, None, :, None] & mw[None, :, None, None, :, None, :]
    logits = jnp.where(mask, logits.astype(jnp.float32) * scale, -jnp.inf)
    sh = logits.shape
    p = jax.nn.softmax(logits.reshape(*sh[:-2], -1), axis=-1).reshape(sh).astype(v.dtype)
    out = jnp.einsum("bxynijkl,bxkylnd->bxiyjnd", p, vt)
    return out.reshape(B, nth * th, ntw * tw, nh, d)[:, :H, :W]


def shifted_window_masks(n_h: int, n_w: int, ws: int, shift: int) -> np.ndarray:
    """k-diffusion ``make_shifted_window_masks``: bool [n_h, n_w, ws, ws, ws, ws], True = attend.

    Windows in row 0 / column 0 hold tokens rolled around from the far side; there a query
    attends only to keys on its own side of ``pos < shift``, per axis.
    """
    ph, pw, qh, qw, kh, kw = np.meshgrid(
        *(np.arange(n) for n in (n_h, n_w) + (ws,) * 4), indexing="ij"
    )
    top, left = ph == 0, pw == 0
    same_h = (qh < shift) == (kh < shift)
    same_w = (qw < shift) == (kw < shift)
    return (~top | same_h) & (~left | same_w)


def shifted_window_attention(
    q: Array, k: Array, v: Array, window_size: int, shift: int, *, scale: float | None = None
) -> Array:
    """Attention within (shifted) ws x ws windows, k-diffusion's masks: [B,H,W,nh,d] -> same."""
    B, H, W, nh, d = q.shape
    ws = window_size
    if H % ws or W % ws:
        raise ValueError(f"window_size {ws} must divide the {H}x{W} token grid")
    n_h, n_w = H // ws, W // ws
    scale = d**-0.5 if scale is None else scale

    def windows(x: Array) -> Array:  # roll(+shift) then [B, n_h, n_w, nh, ws*ws, d]
        x = jnp.roll(x, (shift, shift), axis=(1, 2)).reshape(B, n_h, ws, n_w, ws, nh, d)
        return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(B, n_h, n_w, nh, ws * ws, d)

    mask = shifted_window_masks(n_h, n_w, ws, shift).reshape(n_h, n_w, 1, ws * ws, ws * ws)
    logits = jnp.einsum(
        "bxyniD,bxynjD->bxynij", windows(q), windows(k), preferred_element_type=jnp.float32
    )
    logits = jnp.where(mask, logits.astype(jnp.float32) * scale, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bxynij,bxynjD->bxyniD", p, windows(v)).reshape(B, n_h, n_w, nh, ws, ws, d)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, nh, d)
    return jnp.roll(out, (-shift, -shift), axis=(1, 2))


def global_attention(q: Array, k: Array, v: Array, *, scale: float | None = None) -> Array:
    """Full softmax attention over all H*W tokens: [B,H,W,nh,d] -> [B,H,W,nh,d]."""
    B, H, W, nh, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qs, ks, vs = (t.reshape(B, H * W, nh, d) for t in (q, k, v))
    logits = jnp.einsum("bind,bjnd->bnij", qs, ks, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnij,bjnd->bind", p, vs).reshape(B, H, W, nh, d)
