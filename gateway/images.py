"""Turns an OpenAI `image_url` into the image's encoded bytes, under limits.

`data:image/...;base64,` URLs are decoded here; http(s) URLs are fetched by
gateway.media_guard (unless `--remote-images off`), under its address rules. Each image,
inline or fetched, then gets a cheap header check (format known, width * height within
the pixel limit) without decoding its pixels: the full decode happens on the vision server.
Every failure is a 400 `ApiError` whose message names the field (`param`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.media_guard import MediaFetcher, MediaKind, image_kind, too_big

DECODE_IN_THREAD_BYTES = 1024 * 1024
"""data: URLs longer than this are base64-decoded off the event loop."""


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


async def load_image(
    url: str, config: GatewayConfig, fetcher: MediaFetcher | None, param: str
) -> bytes:
    """The image bytes behind `url`, checked against the config's limits."""
    data = await load_media(url, image_kind(config), fetcher, param)
    check_image(data, config.max_image_pixels, param)
    return data


async def load_media(url: str, kind: MediaKind, fetcher: MediaFetcher | None, param: str) -> bytes:
    """The bytes behind an image or video URL: a data: URL decoded here (large ones off the
    event loop), an http(s) URL fetched under the media guard unless fetching is off."""
    scheme = url[: url.find(":") + 1].lower()
    if scheme == "data:":
        if len(url) > DECODE_IN_THREAD_BYTES:
            return await asyncio.to_thread(decode_data_url, url, kind.max_bytes, param, kind.name)
        return decode_data_url(url, kind.max_bytes, param, kind.name)
    if scheme in ("http:", "https:"):
        if fetcher is None:
            raise ApiError(
                400,
                f"{param}: {kind.name} URLs are not fetched by this server; send the "
                f"{kind.name} inline as a data:{kind.name}/...;base64,... URL",
                param=param,
                code="remote_images_disabled",
            )
        return await fetcher.fetch(url, param, kind)
    raise ApiError(
        400,
        f"{param}: unsupported {kind.name} URL scheme {scheme or url[:16]!r}; "
        f"use data:{kind.name}/...;base64,... or http(s)",
        param=param,
    )


def decode_data_url(url: str, max_bytes: int, param: str, kind: str = "image") -> bytes:
    """Bytes of a `data:<kind>/<type>;base64,<payload>` URL (kind "image" or "video")."""
    example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ApiError(400, f"{param}: data: URL has no ',' before its payload", param=param)
    mime, *options = (part.strip().lower() for part in header.split(";"))
    if not mime.startswith(f"{kind}/"):
        raise ApiError(
            400,
            f"{param}: data: URL must have {'an' if kind == 'image' else 'a'} {kind} MIME type "
            f"({example}), got {mime or 'none'!r}",
            param=param,
        )
    if "base64" not in options:
        raise ApiError(
            400, f"{param}: data: URL must be base64-encoded (data:{mime};base64,...)", param=param
        )
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise too_big(param, max_bytes, kind)
    data = _b64decode(payload, param)
    if len(data) > max_bytes:
        raise too_big(param, max_bytes, kind)
    return data


def _b64decode(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = "".join(payload.split())  # MIME-style line breaks are fine
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{param}: data: URL payload is not valid base64", param=param
        ) from None


def check_image(data: bytes, max_pixels: int, param: str) -> ImageHeader:
    """Reads the image header only: the format must be known and the size within limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                header = ImageHeader(image.format or "", image.width, image.height)
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, max_pixels, None) from None
    except UnidentifiedImageError:
        raise ApiError(
            400, f"{param}: the data is not an image in a known format", param=param
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(
            400, f"{param}: the image header is unreadable: {exc}", param=param
        ) from None
    if not header.format:
        raise ApiError(400, f"{param}: the image format is unknown", param=param)
    if header.width < 1 or header.height < 1:
        raise ApiError(
            400, f"{param}: the image is empty ({header.width}x{header.height})", param=param
        )
    if header.width * header.height > max_pixels:
        raise _too_many_pixels(param, max_pixels, header)
    return header


def _too_many_pixels(param: str, max_pixels: int, header: ImageHeader | None) -> ApiError:
    size = f" ({header.width}x{header.height})" if header else ""
    return ApiError(
        400,
        f"{param}: the image{size} has more than the limit of {max_pixels} pixels",
        param=param,
    )
