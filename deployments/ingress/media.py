"""Images and videos in requests: fetched and decoded safely in the router.

Decoding happens in the router, not the model replica: a corrupt, oversized or refused input
fails fast with a 4xx before a (GPU) replica is tied up, and decoding CPU stays off the GPU
machines. The price is moving decoded pixels to the replica through Ray's object store: frames
are sampled here first (at most `max_video_frames`), and passing 32 sampled frames to another
Ray process measured 34 ms at 640x480 (29 MB) and 60 ms at 1280x720 (88 MB) on a 2-core CPU
machine, small beside decoding the video and prefilling its visual tokens. Blocking decode work
runs in threads (videos in worker processes, see VideoDecoder), bounded by a semaphore, so the
router's event loop keeps streaming other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.resolver import ThreadedResolver
from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.common.config import MediaConfig
from deployments.common.digest import stamp_image, stamp_video
from deployments.common.errors import MediaError, MediaRefusedError, PayloadTooLargeError
from deployments.common.lru import ByteLRU, CacheObserver, ignore_cache_event
from deployments.ingress.schemas import ImagePart, VideoPart
from deployments.common.types import ImageBudget, Video, media_nbytes
from deployments.ingress.video import VideoDecoder, decode_video  # noqa: F401 (decode_video: part of this module's API)

if TYPE_CHECKING:
    from ray.serve.metrics import Histogram

IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP"}
_REDIRECTS = {301, 302, 303, 307, 308}


class MediaLoader:
    """Turns `image_url` / `video_url` parts into PIL images and sampled `Video`s."""

    def __init__(self, config: MediaConfig, decode_seconds: "Histogram | None" = None,
                 observe: CacheObserver = ignore_cache_event) -> None:
        self.config = config
        self._decoding = asyncio.Semaphore(config.max_concurrent_decodes)
        self._decode_seconds = decode_seconds
        self._videos = VideoDecoder(config.max_concurrent_decodes)
        # Data URLs decoded recently: a chat resends its images every turn. Values: (item, expiry time).
        self.decoded = ByteLRU("decoded", config.decoded_cache_bytes, observe)

    async def load(self, part: ImagePart | VideoPart, videos_in_request: int = 1,
                   images: ImageBudget | None = None) -> Image.Image | Video:
        """Fetch and decode one part. Raises MediaError / MediaRefusedError / PayloadTooLargeError.

        The request's videos share `max_video_decoded_bytes` equally (`videos_in_request` of them); its images
        draw on one `ImageBudget` of `max_image_decoded_bytes` (a new one per call when none is given)."""
        started = time.perf_counter()
        if images is None:
            images = ImageBudget(self.config.max_image_decoded_bytes)
        result = await self._load(part, max(1, videos_in_request), images)
        if self._decode_seconds is not None:
            kind = "image" if isinstance(part, ImagePart) else "video"
            self._decode_seconds.observe(time.perf_counter() - started, tags={"kind": kind})
        return result

    async def _load(self, part: ImagePart | VideoPart, videos_in_request: int, images: ImageBudget
                    ) -> Image.Image | Video:
        image = isinstance(part, ImagePart)
        url = part.image_url.url if image else part.video_url.url
        if image:
            options = f"image:{self.config.max_image_pixels}"
        else:
            fps = min(part.video_url.fps or self.config.video_fps, self.config.video_fps_cap)
            max_frames = min(part.video_url.max_frames or self.config.max_video_frames, self.config.max_video_frames)
            budget = self.config.max_video_decoded_bytes // videos_in_request
            options = f"video:{fps}:{max_frames}:{self.config.max_video_duration_s}:" \
                      f"{self.config.max_video_frame_pixels}:{budget}"
        key = None
        if self.decoded.budget and url[:5].lower() == "data:":
            key = await asyncio.to_thread(_content_key, options, url)
            found = self.decoded.get(key)
            if found is not None and found[1] > time.monotonic():
                if image:
                    images.take(*found[0].size)  # held for this request as a decoded one would be
                return found[0]
        if image:
            data = await self._read(url, "image", self.config.max_image_bytes)
            async with self._decoding:
                item = await asyncio.to_thread(lambda: stamp_image(decode_image(
                    data, self.config.max_image_pixels, self.config.max_image_aspect_ratio, images)))
        else:
            data = await self._read(url, "video", self.config.max_video_bytes)
            async with self._decoding:
                item = await asyncio.to_thread(self._videos.decode, data, fps, max_frames,
                                               self.config.max_video_duration_s, self.config.max_video_frame_pixels,
                                               budget)
                item = await asyncio.to_thread(stamp_video, item)
        if key is not None:
            self.decoded.put(key, (item, time.monotonic() + self.config.decoded_cache_ttl_s), media_nbytes(item))
        return item

    async def _read(self, url: str, kind: str, max_bytes: int) -> bytes:
        scheme = _split(url, kind).scheme.lower()
        if scheme == "data":  # base64 decoding of up to max_image/video_bytes: off the event loop
            return await asyncio.to_thread(read_data_url, url, kind, max_bytes)
        if scheme in ("http", "https"):
            return await fetch(url, kind, max_bytes, self.config)
        if scheme in ("", "file"):
            return await asyncio.to_thread(read_local, url, kind, max_bytes, self.config.local_media_dir)
        raise MediaRefusedError(f"Unsupported {kind} URL scheme '{scheme}': use data:, http(s): or a local path")


def _content_key(options: str, url: str) -> bytes:
    """A cryptographic digest of a data URL (its content) and the decoding options: no client can make
    its URL collide with another's to receive their pixels."""
    return hashlib.sha256(options.encode() + b"\0" + url.encode()).digest()[:16]


def read_data_url(url: str, kind: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"The {kind} data URL must be base64: data:<type>;base64,<data>")
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    if len(payload) * 3 // 4 - padding > max_bytes:  # the decoded size, known before decoding
        raise _too_large(kind, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"The {kind} data URL is not valid base64") from None


def read_local(url: str, kind: str, max_bytes: int, media_dir: str | None) -> bytes:
    if media_dir is None:
        raise MediaRefusedError(f"Local {kind} paths are off: set media.local_media_dir to allow a directory")
    root = Path(media_dir).resolve()
    raw = unquote(_split(url, kind).path) if url.startswith("file:") else url
    try:
        path = (root / raw).resolve()  # an absolute `raw` replaces root; resolve() follows symlinks
        if not path.is_relative_to(root):
            raise MediaRefusedError(f"The {kind} path is outside the media directory")
        if not path.is_file():
            raise MediaError(f"No such {kind} file in the media directory")
        if path.stat().st_size > max_bytes:
            raise _too_large(kind, max_bytes)
        return path.read_bytes()
    except (OSError, ValueError):  # a NUL byte, a name too long, unreadable...
        raise MediaError(f"The {kind} path cannot be read") from None


def decode_image(data: bytes, max_pixels: int, max_aspect_ratio: float = float("inf"),
                 budget: ImageBudget | None = None) -> Image.Image:
    """Decode to RGB with EXIF orientation applied; checks the pixel count, the aspect ratio and the request's
    decoded-bytes budget before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise MediaError(f"Unsupported image format {image.format}: use PNG, JPEG, WebP, GIF or BMP")
        width, height = image.size
        if width * height > max_pixels:
            raise MediaError(
                f"The image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if max(width, height) > max_aspect_ratio * max(1, min(width, height)):
            raise MediaError(f"The image is {width}x{height}: its sides' ratio is over the limit of "
                             f"{max_aspect_ratio:g} to 1")
        if budget is not None:
            budget.take(width, height)
        image.load()  # GIFs: the first frame
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:  # Pillow's own cap (2x its MAX_IMAGE_PIXELS), hit at open
        limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
        raise MediaError(f"The image has more pixels than the limit of {limit}") from None
    except UnidentifiedImageError:
        raise MediaError("The image could not be decoded: not a supported image file") from None
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure on client bytes (broken EXIF, chunks that inflate
        # too large, truncated data: OSError, ValueError, SyntaxError, struct.error, zlib.error...) is a 400
        raise MediaError("The image could not be decoded: the file is corrupt or truncated") from None
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        # Transparent pixels go on white, not on whatever colour they happen to store.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


class _GuardedResolver(ThreadedResolver):
    """Resolves names and refuses the host when any address is not public (SSRF guard).

    The check happens on the addresses the connection will use, so a name that resolves to
    127.0.0.1 or 169.254.169.254 is refused even when the name itself looks harmless.
    """

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private
        self.refused: str | None = None

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await super().resolve(host, port, family)
        for result in results:
            if not self.allow_private and not _is_public(result["host"]):
                self.refused = host
                raise OSError(f"refused address for {host}")
        return results


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


async def fetch(url: str, kind: str, max_bytes: int, config: MediaConfig) -> bytes:
    """GET `url` with redirects, timeouts and a byte cap, refusing non-public addresses."""
    if not config.allow_remote:
        raise MediaRefusedError(f"Fetching {kind} URLs is off: send a data: URL or set media.allow_remote")
    resolver = _GuardedResolver(config.allow_private_addresses)
    timeout = aiohttp.ClientTimeout(total=config.fetch_timeout_s, sock_connect=config.connect_timeout_s,
                                    sock_read=config.read_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), timeout=timeout) as session:
        for _ in range(config.max_redirects + 1):
            _check_url(url, kind, config)
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise MediaError(f"Fetching the {kind} URL failed with HTTP {response.status}")
                    return await _read_capped(response, kind, max_bytes)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a URL
                # aiohttp cannot parse or a host it cannot encode
                if resolver.refused:
                    raise MediaRefusedError(f"The {kind} URL resolves to a private or local address") from None
                if isinstance(exc, asyncio.TimeoutError):
                    raise MediaError(
                        f"Fetching the {kind} URL timed out (limits: connect {config.connect_timeout_s:g} s, "
                        f"between reads {config.read_timeout_s:g} s, in all {config.fetch_timeout_s:g} s)") from None
                raise MediaError(f"Fetching the {kind} URL failed: {type(exc).__name__}") from None
        raise MediaError(f"The {kind} URL redirected more than {config.max_redirects} times")


def _split(url: str, kind: str):
    """urlsplit, with its ValueError (an unclosed IPv6 bracket, a bad port...) as a 400."""
    try:
        parts = urlsplit(url)
        parts.hostname, parts.port  # noqa: B018 - both parse lazily and may raise
        return parts
    except ValueError:
        raise MediaError(f"The {kind} URL is malformed") from None


def _check_url(url: str, kind: str, config: MediaConfig) -> None:
    parts = _split(url, kind)
    host = (parts.hostname or "").lower()
    try:
        host.encode("idna")
    except UnicodeError:
        raise MediaError(f"The {kind} URL's host is not a valid domain name") from None
    if parts.scheme not in ("http", "https") or not host:
        raise MediaRefusedError(f"The {kind} URL must be http(s) with a host")
    if config.allowed_domains and not any(host == d or host.endswith("." + d) for d in config.allowed_domains):
        raise MediaRefusedError(f"The {kind} URL's domain {host} is not in media.allowed_domains")
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: the resolver checks the addresses it resolves to
    if not config.allow_private_addresses and not _is_public(str(literal)):
        raise MediaRefusedError(f"The {kind} URL points to a private or local address")


async def _read_capped(response: aiohttp.ClientResponse, kind: str, max_bytes: int) -> bytes:
    if response.content_length is not None and response.content_length > max_bytes:
        raise _too_large(kind, max_bytes)
    data = bytearray()
    async for block in response.content.iter_chunked(64 * 1024):
        data += block
        if len(data) > max_bytes:
            raise _too_large(kind, max_bytes)
    return bytes(data)


def _too_large(kind: str, max_bytes: int) -> PayloadTooLargeError:
    mib = 1024 * 1024
    limit = f"{max_bytes // mib} MiB" if max_bytes % mib == 0 else f"{max_bytes} byte"
    return PayloadTooLargeError(f"The {kind} is larger than the {limit} limit", param="messages")
