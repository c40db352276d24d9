"""Reading an uploaded photo safely: size limits, decompression bombs, non-images.

Everything a client can get wrong becomes an ``UploadError`` carrying the HTTP status to
answer with (400, 413 or 415) and a message saying what was wrong; nothing here raises
anything else for bad bytes.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

#: default upload limit: 10 MiB of encoded image
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: default pixel limit (width x height after decoding): 40 megapixels, about a 7700 x 5200 photo
MAX_PIXELS = 40_000_000


class UploadError(Exception):
    """A bad upload: ``status`` is the HTTP status to answer with, ``str(err)`` the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        # raised in a prepare worker process, it comes back to the server pickled: status and message
        return type(self), (self.status, str(self))


def check_image(data: bytes, max_pixels: int = MAX_PIXELS, name: str = "upload") -> tuple[int, int]:
    """Check an encoded photo from its header alone; return its (width, height) in pixels.

    Only the header is parsed, so a small file that would expand to gigabytes (a
    decompression bomb) is refused before any pixel is decoded. Raises UploadError: 400
    empty or corrupt header, 413 more than ``max_pixels`` pixels, 415 not an image format
    Pillow reads.
    """
    if not data:
        raise UploadError(400, f"{name}: empty upload (no image bytes)")
    try:
        # Pillow itself refuses over 2 x Image.MAX_IMAGE_PIXELS; the explicit limit below is lower
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise UploadError(413, f"{name}: too many pixels to decode ({err})") from None
    except UnidentifiedImageError:
        raise UploadError(
            415, f"{name}: not an image format that can be read (JPEG, PNG, WebP, BMP, GIF, TIFF)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UploadError(400, f"{name}: corrupt image header ({err})") from None
    if width < 1 or height < 1:
        raise UploadError(400, f"{name}: image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise UploadError(
            413, f"{name}: {width} x {height} = {width * height} pixels is over the limit of {max_pixels} pixels"
        )
    return width, height
