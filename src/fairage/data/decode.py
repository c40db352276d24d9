"""The one image decoder: every path that turns an image file into pixels goes through here.

The training/evaluation cache (``fairage.data.cache``), ``fairage predict`` and ``fairage
serve`` decode with these functions, so a face gives the model the same pixels in training
and in use:

* EXIF orientation applied (``ImageOps.exif_transpose``);
* 16/32-bit grey (``I;16*``, ``I``, ``F``) scaled to 8 bits (0-65535 -> 0-255 when a value
  exceeds 255), never clipped;
* palette, CMYK, grey and other modes converted to RGB; transparency (``RGBA``, ``LA``,
  ``PA``, palette with a transparent index) composited on white;
* a face crop resized to S x S with Pillow's bilinear filter (antialiased when shrinking),
  JPEGs decoded at the smallest draft scale >= S first (fast, and what training saw).

Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) refuses huge images.
Every failure is a DataError naming the file (``<bytes>`` for in-memory data).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from ..errors import DataError

#: Pillow modes of more than 8 bits per grey value
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def source_name(source) -> str:
    """How messages name ``source``: its path, or ``<bytes>``."""
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def open_image(source):
    """Pillow image of a path or bytes (header parsed); DataError for unreadable input and decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    name = source_name(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(source)) if name == "<bytes>" else source)
            im.size  # noqa: B018 - header parsed; the pixel count is checked on open
        return im
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name}: refused, too many pixels for a photo ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except OSError as err:
        raise DataError(f"{name}: cannot read ({err})") from None


def pil_to_rgb(im) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 3) RGB; transparency composited on white, 16/32-bit scaled to 8."""
    from PIL import Image

    if im.mode in DEEP_MODES:
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")
    if im.mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in ("LA", "La", "RGBA", "RGBa"):
        # transparent pixels on white, as an image viewer shows them
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_rgb(im, name: str, draft_size: int | None = None) -> np.ndarray:
    """An opened Pillow image as uint8 (H, W, 3) RGB in its EXIF orientation (see the module doc).

    ``draft_size``: a JPEG is decoded at the smallest draft scale whose sides are >= it.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))  # JPEG: decode at the smallest scale >= size
            im = ImageOps.exif_transpose(im)
            rgb = pil_to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name}: refused, too many pixels for a photo ({err})") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        TypeError,
        IndexError,
    ) as err:  # truncated or corrupt data
        raise DataError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"{name}: decoded to an unusable array of shape {rgb.shape}")
    return rgb


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """A photo (path or file bytes) as a uint8 (H, W, 3) RGB array in its EXIF orientation."""
    with open_image(source) as im:
        return to_rgb(im, source_name(source))


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), Pillow bilinear (antialiased when shrinking)."""
    if rgb.shape[:2] == (size, size):
        return rgb
    from PIL import Image

    return np.asarray(
        Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR),
        dtype=np.uint8,
    )


def decode_face(source: str | os.PathLike | bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A face crop file as uint8 (size, size, 3) RGB, and the file's (width, height) after its EXIF turn."""
    with open_image(source) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: to_rgb reports the file if it matters
            orientation = None
        if orientation in (5, 6, 7, 8):  # orientations that swap the axes
            width, height = height, width
        return resize_square(to_rgb(im, source_name(source), draft_size=size), size), (
            width,
            height,
        )


#: a face's crop margin: the detector box's longer side grows by this fraction of itself on each side
CROP_MARGIN = 0.4


def crop_box(box, margin: float = CROP_MARGIN) -> tuple[int, int, int]:
    """The square crop ``(x, y, side)`` of a detector box ``(x, y, w, h)``, original pixels.

    The box's longer side grows by ``margin`` of itself on each side (side = (1 + 2 margin)
    max(w, h)), centred on the box's centre.
    """
    x, y, w, h = (float(v) for v in box[:4])
    side = (1.0 + 2.0 * margin) * max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), max(1, int(round(side)))


def crop_face(rgb: np.ndarray, box, size: int, margin: float = CROP_MARGIN) -> np.ndarray:
    """The face crop of ``box`` in ``rgb`` (see ``crop_box``; outside the photo: black), uint8 (size, size, 3)."""
    x0, y0, side = crop_box(box, margin)
    height, width = rgb.shape[:2]
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return resize_square(crop, size)
