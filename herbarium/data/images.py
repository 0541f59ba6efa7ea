"""Decoding image files, fast and with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from herbarium.errors import HerbariumError

# Errors Pillow raises for missing, unreadable, truncated or corrupt files.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(HerbariumError, RuntimeError):
    """An image file is missing, unreadable or truncated."""


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image as RGB, letting libjpeg downscale while decoding when it can.

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
    # convert() always copies; an image that is already RGB (most JPEGs) is returned as is.
    return image if image.mode == "RGB" else image.convert("RGB")
