"""Decoding stored or source image bytes into an 8-bit RGB ``PIL.Image``.

One conversion, used by ingest (before re-encoding) and by the training/eval loader (at
read time, which matters with ``--keep-original``: the store then holds the source bytes
as they are on disk), so that both see the same pixels:

* EXIF orientation is applied (a phone photo taken upright is stored upright);
* 16-bit and 32-bit grayscale (modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) and float
  (``F``) images are scaled to 8 bits by their value range, 65535 -> 255, instead of
  being clipped to white (see :func:`value_range`);
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied modes, a palette or grayscale
  image with a ``transparency`` entry) is composited on white, not dropped to whatever
  colour the transparent pixels happen to hold (often black);
* palette, 1-bit, grayscale, CMYK, YCbCr, LAB and HSV images are converted to RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes (any format PIL reads) to an 8-bit RGB image. Raises what PIL
    raises on unreadable input."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened (loaded) image as 8-bit RGB: EXIF orientation applied, high bit depths
    scaled, transparency composited on white."""
    img = _upright(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_BIT_DEPTH:
        return _to_8bit(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an image with a damaged EXIF block is kept as it
    is rather than rejected (its pixels are fine)."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - malformed EXIF data can trip any parser path
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def value_range(mode: str, pixels: np.ndarray) -> tuple[float, float]:
    """The range that maps to 0..255 for a high-bit-depth image.

    ``I;16*``: 0..65535. ``I``: 0..65535 when the values fit (16-bit PNG/TIFF data),
    otherwise the image's own min..max. ``F``: 0..1, 0..255 or 0..65535, the first that
    holds every value, otherwise the image's own min..max."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    nominal = (1.0, 255.0, 65535.0) if mode == "F" else (65535.0,)
    for top in nominal:
        if lo >= 0 and hi <= top:
            return 0.0, top
    return lo, hi if hi > lo else lo + 1.0


def _to_8bit(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img)  # uint16 (either byte order), int32 or float32
    lo, hi = value_range(img.mode, pixels)
    scaled = (pixels.astype(np.float64) - lo) * (255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
