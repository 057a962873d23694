"""Images in requests: data URLs, and file:// paths under an allowed directory. Nothing is fetched from the network;
bytes, decoded pixels, padded pixels (LLaVA pads to a square: max(w, h)^2) and the aspect ratio are bounded from
the header, before anything is decoded (decompression bombs are 413)."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from dynllava.errors import InputError
from dynllava.runtime.processor import MAX_ASPECT_RATIO, ImageTooLarge, open_image


class MediaError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int, max_aspect: float = MAX_ASPECT_RATIO, pad: bool = True) -> Image.Image:
    try:
        return open_image(data, max_pixels, max_aspect, pad)
    except ImageTooLarge as exc:
        raise MediaError(exc.message, 413) from exc
    except InputError as exc:
        raise MediaError(exc.message) from exc


def load_image_url(url: str, allowed_dir: Path | None, max_bytes: int, max_pixels: int,
                   max_aspect: float = MAX_ASPECT_RATIO, pad: bool = True) -> Image.Image:
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
        return decode_image(data, max_pixels, max_aspect, pad)
    if url.startswith("file://"):
        if allowed_dir is None:
            raise MediaError("file:// images are disabled; start the server with --allowed-media-dir DIR", 403)
        try:
            path = Path(os.path.realpath(unquote(urlparse(url).path)))
            root = Path(os.path.realpath(allowed_dir))
            if root != path and root not in path.parents:
                raise MediaError(f"file {path} is outside the allowed media directory", 403)
            if not path.is_file():
                raise MediaError(f"image file {path} not found")
            if path.stat().st_size > max_bytes:
                raise MediaError(f"image larger than {max_bytes} bytes", 413)
            data = path.read_bytes()
        except (ValueError, OSError) as exc:  # NUL bytes in the path, unreadable files
            if isinstance(exc, MediaError):
                raise
            raise MediaError(f"cannot read the image file: {exc}") from exc
        return decode_image(data, max_pixels, max_aspect, pad)
    raise MediaError("image_url must be a data: URL or a file:// path under the allowed media directory; the server "
                     "never fetches from the network")
