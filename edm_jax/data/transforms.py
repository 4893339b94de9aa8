"""The dataset tool's crop/resize transforms (NVlabs/edm and edm2 ``dataset_tool.py``).

All take and return uint8 [H,W,C] arrays (C = 1 or 3) and use PIL as the reference does:
- ``center-crop``: crop the centred min(H, W) square, Lanczos resize to R x R (NVlabs/edm).
- ``center-crop-dhariwal``: ADM's ImageNet crop (edm2): halve with a box filter while the
  shorter side is >= 2R, bicubic resize so the shorter side is R (sizes rounded), then crop
  the centred R x R.
- ``resize``: Lanczos resize to R x R, no crop (aspect ratio not kept).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image

__all__ = ["TRANSFORMS", "center_crop", "center_crop_dhariwal", "get_transform", "resize"]


def _pil(img: np.ndarray) -> PIL.Image.Image:
    """uint8 [H,W,C] -> PIL image (L or RGB)."""
    return PIL.Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img)


def _array(img: PIL.Image.Image, channels: int) -> np.ndarray:
    """PIL image -> uint8 [H,W,C]."""
    a = np.asarray(img, dtype=np.uint8)
    return a.reshape(*a.shape[:2], channels)


def resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """Lanczos resize to resolution x resolution (unchanged if already that size)."""
    if img.shape[:2] == (resolution, resolution):
        return img
    out = _pil(img).resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return _array(out, img.shape[-1])


def center_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """NVlabs/edm center-crop: centred min-side square, Lanczos resize to R x R."""
    h, w = img.shape[:2]
    crop = min(h, w)
    img = img[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    out = _pil(img).resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return _array(out, img.shape[-1])


def center_crop_dhariwal(img: np.ndarray, resolution: int) -> np.ndarray:
    """ADM/edm2 center-crop-dhariwal: box halvings, bicubic to short side R, centre crop."""
    channels = img.shape[-1]
    pil = _pil(img)
    while min(*pil.size) >= 2 * resolution:
        w, h = pil.size
        pil = pil.resize((w // 2, h // 2), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(*pil.size)
    size = (round(pil.size[0] * scale), round(pil.size[1] * scale))
    arr = _array(pil.resize(size, resample=PIL.Image.Resampling.BICUBIC), channels)
    y, x = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[y : y + resolution, x : x + resolution]


TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "center-crop": center_crop,
    "center-crop-dhariwal": center_crop_dhariwal,
    "resize": resize,
}


def get_transform(name: str | None, resolution: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The transform `name` at `resolution`; None keeps images as they are (sizes must agree)."""
    if name is None:
        if resolution is None:
            return lambda img: img
        return lambda img: resize(img, resolution)
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; valid: {sorted(TRANSFORMS)}")
    if resolution is None or resolution < 1:
        raise ValueError(f"transform {name!r} needs --resolution (a positive int)")
    fn = TRANSFORMS[name]
    return lambda img: fn(img, resolution)
