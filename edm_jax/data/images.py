"""Image decoding and fitting to the configured resolution and channel count.

Conversions (documented behaviour, applied to every file-based source):
- mode: anything PIL reads is converted to ``L`` (channels=1) or ``RGB`` (channels=3);
  palette images are expanded, alpha is dropped, 16-bit greyscale keeps its top 8 bits.
- size: non-square images are centre-cropped to their shorter side, then resized to
  ``resolution`` with Lanczos (as NVlabs/edm ``dataset_tool.py --transform=center-crop``).
  Images smaller than ``resolution`` are an error: they are never upsampled.
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image

__all__ = [
    "DECODE_ERRORS",
    "IMAGE_EXTENSIONS",
    "check_size",
    "decode_image",
    "fit_array",
    "fit_image",
    "read_header",
    "verify_image",
]

# What decoding a bad file raises: PIL's DecompressionBombError (an image whose header claims
# more than 2 x Image.MAX_IMAGE_PIXELS pixels) is not an OSError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_MODES = {1: "L", 3: "RGB"}


def _check_channels(channels: int) -> None:
    """Raise if channels is not 1 or 3."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def check_size(size: tuple[int, int], resolution: int, name: str) -> None:
    """Raise if an image of size (width, height) cannot give resolution x resolution."""
    if min(size) < resolution:
        raise ValueError(
            f"{name}: image is {size[0]}x{size[1]} but resolution={resolution} needs at least "
            f"{resolution}x{resolution} (images are cropped and downsampled, never upsampled); "
            "lower `resolution` or use larger images"
        )


def read_header(data: bytes | str | os.PathLike, name: str) -> tuple[int, int]:
    """(width, height) of an image from its header; a clear error naming a bad file."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with PIL.Image.open(source) as img:
            return img.size
    except DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def _to_mode(img: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """Convert any PIL mode to L or RGB (16/32-bit integer greyscale keeps its top 8 bits)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.int64)
        img = PIL.Image.fromarray(np.clip(a >> 8, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == _MODES[channels] else img.convert(_MODES[channels])


def fit_image(img: PIL.Image.Image, resolution: int, channels: int, name: str) -> np.ndarray:
    """Centre-crop to square, resize to resolution (Lanczos), convert mode: uint8 [R,R,C]."""
    _check_channels(channels)
    check_size(img.size, resolution, name)
    img = _to_mode(img, channels)
    w, h = img.size
    c = min(w, h)
    if (w, h) != (c, c):
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
    if c != resolution:
        img = img.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, channels)


def decode_image(data: bytes | str | os.PathLike, resolution: int, channels: int, name: str):
    """Decode an encoded image (bytes or path) and fit it: uint8 [R,R,C]; errors name the file."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with PIL.Image.open(source) as img:
            img.load()
            return fit_image(img, resolution, channels, name)
    except DECODE_ERRORS as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e


def fit_array(image: np.ndarray, resolution: int, channels: int, name: str) -> np.ndarray:
    """Fit a uint8 [H,W,C] or [H,W] array like fit_image (no copy when already right)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape == (resolution, resolution, channels):
        return image
    if image.shape[-1] == 1 and channels == 3 and image.shape[0] == image.shape[1] == resolution:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: images need 1, 3 or 4 channels, got shape {image.shape}")
    img = PIL.Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    return fit_image(img, resolution, channels, name)


def verify_image(data: bytes | str | os.PathLike, resolution: int, name: str) -> None:
    """Read the header, check the size and decode every pixel once; errors name the file."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        img = PIL.Image.open(source)
    except DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    with img:
        check_size(img.size, resolution, name)
        try:
            img.load()
        except DECODE_ERRORS as e:
            raise ValueError(f"cannot decode image {name}: {e}") from e
