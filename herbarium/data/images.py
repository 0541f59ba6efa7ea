"""Decoding image files, fast, as a viewer shows them, and with errors that name the file.

Every input path (training, evaluation, ``herbarium predict``, the PIL
fallback of the device path, report thumbnails) reads an image through
:func:`load_rgb`, so an image is the same picture everywhere:

* the EXIF orientation is applied (a phone photo tagged "rotate 90" is
  used upright, not sideways);
* 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) is scaled to 8 bits
  instead of clipped (``convert("RGB")`` turns a 16-bit scan white);
* transparency (``RGBA``, ``LA``, palette with transparency) is laid on
  white, as a page would show it; CMYK, palette and the other modes are
  converted by Pillow.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from herbarium.errors import HerbariumError

# Errors Pillow raises for missing, unreadable, truncated or corrupt files.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel: scaled, not clipped
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255)  # what transparent pixels are laid on


class BadImageError(HerbariumError, RuntimeError):
    """An image file is missing, unreadable or truncated."""


def load_rgb(path: str | Path | IO[bytes], min_side: int | None = None) -> Image.Image:
    """Decode an image as RGB as a viewer shows it (see the module docstring), letting libjpeg downscale when it can.

    ``min_side``: the shorter side the caller still needs. JPEG draft mode
    decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost, so a
    1000x661 herbarium sheet needed at 224 px is decoded at ~500x331 instead
    of being decoded in full and then thrown away by the resize. Draft mode
    never goes below the requested size, so quality at ``min_side`` is kept.
    """
    image = Image.open(path)
    try:
        if min_side and image.format == "JPEG" and min(image.size) >= 2 * min_side:
            scale = min_side / min(image.size)
            image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        image.load()  # Pillow closes the file once the pixels are read
    except BaseException:
        image.close()
        raise
    return as_viewed(image)


def as_viewed(image: Image.Image) -> Image.Image:
    """``image`` in RGB as a viewer shows it; an upright RGB image is returned as is (no copy), ``image`` is never changed."""
    image = upright(image)
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        return Image.fromarray(_to_8_bits(image), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a new image), or ``image`` itself when it is upright already."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _to_8_bits(image: Image.Image) -> np.ndarray:
    """A wide greyscale image as uint8 [H, W], its full range mapped onto 0..255.

    ``I;16``: 0..65535. ``I`` (how some readers give 16-bit files): 0..65535
    when any value passes 255, else already 0..255. ``F``: 0..1 when no
    value passes 1, else as ``I``.
    """
    pixels = np.asarray(image).astype(np.float32)
    peak = float(pixels.max()) if pixels.size else 0.0
    if image.mode.startswith("I;16") or peak > 255:
        top = 65535.0
    elif image.mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = 255.0
    return np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
