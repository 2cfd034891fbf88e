"""Images in and out: one decoder, with a pixel cap checked from the header before any pixel is decoded, and
one PNG data-URL encoder (what servers receive: inline, never a URL to fetch)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlm_orpo.errors import BadRow, first_line

# Images over this many pixels are refused (data rows skipped, served requests rejected): a 12000x12000 PNG of
# a few hundred KB decodes to 430 MB and is decoded again at every epoch. The default of `data.max_image_pixels`
# and of `vlm-orpo serve --max-image-pixels`.
MAX_IMAGE_PIXELS = 40_000_000


def open_image(value, base_dir: Path | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image given as PIL, bytes, a datasets `{"bytes", "path"}` dict or a file path; always RGB.

    The size is checked from the header, before any pixel is decoded."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            return open_image(value["path"], base_dir, max_pixels)
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            image = Image.open(path)
        else:
            raise BadRow("missing image", f"no image data in {type(value).__name__}")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise BadRow("oversized image", f"{image.width}x{image.height} is over {max_pixels:,} pixels")
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, BadRow):
            raise
        raise BadRow("undecodable image", first_line(exc, with_type=False)[:200]) from None
    return image if image.mode == "RGB" else image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
