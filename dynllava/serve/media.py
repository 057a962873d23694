"""Images in requests: data URLs, and file:// paths under an allowed directory. Nothing is fetched from the network;
sizes and pixel counts are bounded before decoding (decompression bombs)."""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError


class MediaError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except (UnidentifiedImageError, OSError) as exc:
        raise MediaError("the image data is not a readable image (PNG, JPEG, WebP, ...)") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image rejected as a decompression bomb: {exc}", 413) from exc
    except (OSError, ValueError) as exc:
        raise MediaError(f"the image data is corrupt: {exc}") from exc
    return image.convert("RGB")


def load_image_url(url: str, allowed_dir: Path | None, max_bytes: int, max_pixels: int) -> Image.Image:
    if not isinstance(url, str):
        raise MediaError("image_url.url must be a string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise MediaError("data URLs must be base64-encoded (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > max_bytes:
            raise MediaError(f"image larger than {max_bytes} bytes", 413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"invalid base64 in the image data URL: {exc}") from exc
        return decode_image(data, max_pixels)
    if url.startswith("file://"):
        if allowed_dir is None:
            raise MediaError("file:// images are disabled; start the server with --allowed-media-dir DIR", 403)
        path = Path(os.path.realpath(unquote(urlparse(url).path)))
        root = Path(os.path.realpath(allowed_dir))
        if root != path and root not in path.parents:
            raise MediaError(f"file {path} is outside the allowed media directory", 403)
        if not path.is_file():
            raise MediaError(f"image file {path} not found")
        if path.stat().st_size > max_bytes:
            raise MediaError(f"image larger than {max_bytes} bytes", 413)
        return decode_image(path.read_bytes(), max_pixels)
    raise MediaError("image_url must be a data: URL or a file:// path under the allowed media directory; the server "
                     "never fetches from the network")
