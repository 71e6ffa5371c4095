"""Fetching and decoding images and videos (deployments/ingress/media.py), without Ray.

Media is made in memory (Pillow for images, PyAV for videos); remote fetching is exercised
against a real aiohttp server on 127.0.0.1 started by the tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import struct
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web
from PIL import Image, ImageFile

from deployments.ingress import media
from deployments.common.config import MediaConfig
from deployments.common.errors import PayloadTooLargeError
from deployments.common.types import ImageBudget
from deployments.ingress.media import (
    MediaError,
    MediaLoader,
    MediaRefusedError,
    decode_image,
    decode_video,
    fetch,
    read_data_url,
    read_local,
)
from deployments.ingress.schemas import ImagePart, VideoPart

MiB = 1024 * 1024
RED, BLUE = (220, 20, 20), (20, 20, 220)

# ---- media made in memory (also imported by tests/e2e/test_media_http.py) ----


def image_bytes(fmt: str, size: tuple[int, int] = (40, 20), color=RED, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def gif_two_frames(size: tuple[int, int] = (40, 20)) -> bytes:
    """An animated GIF: a red frame, then a blue one."""
    frames = [Image.new("RGB", size, RED), Image.new("RGB", size, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def solid_png(width: int, height: int, color=RED, idat: bool = True) -> bytes:
    """A solid-colour RGB PNG written directly (fast and tiny even at 7000x7000).

    idat=False leaves the pixel data out: only the header claims the size.
    """
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not idat:
        return header + _png_chunk(b"IEND", b"")
    compressor = zlib.compressobj(1)
    row = b"\x00" + bytes(color) * width
    rows_per_block = max(1, 4 * MiB // len(row))
    blocks, rest = divmod(height, rows_per_block)
    data = b"".join(compressor.compress(row * rows_per_block) for _ in range(blocks))
    data += compressor.compress(row * rest) + compressor.flush()
    return header + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


# container format -> (PyAV muxer, encoder)
VIDEO_FORMATS = {
    "mp4": ("mp4", "libx264"),
    "mov": ("mov", "libx264"),
    "mkv": ("matroska", "libx264"),
    "webm": ("webm", "libvpx-vp9"),
    "avi": ("avi", "mpeg4"),
}


def encoder_available(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def require_encoder(container: str) -> None:
    encoder = VIDEO_FORMATS[container][1]
    if not encoder_available(encoder):
        pytest.skip(f"PyAV in this environment has no '{encoder}' encoder for {container}")


def video_bytes(container: str = "mp4", frames: int = 20, size: tuple[int, int] = (64, 48), fps: int = 10) -> bytes:
    """A video whose frame i has red level 12*i mod 256 (so decoded frames show which index they are)."""
    muxer, encoder = VIDEO_FORMATS[container]
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as output:
        stream = output.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[..., 0] = 12 * index % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---- decode_image ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_decode_image_supported_formats_give_rgb_of_the_right_size(fmt):
    image = decode_image(image_bytes(fmt, (40, 20)), max_pixels=10**6)
    assert image.mode == "RGB" and image.size == (40, 20)
    red, green, blue = image.getpixel((5, 5))
    assert red > 180 and green < 60 and blue < 60  # the colour survived, within JPEG/WebP loss


def test_decode_image_animated_gif_returns_the_first_frame_as_rgb():
    image = decode_image(gif_two_frames((40, 20)), max_pixels=10**6)
    assert image.mode == "RGB" and image.size == (40, 20)
    red, _, blue = image.getpixel((5, 5))
    assert red > 180 and blue < 60, "the first (red) frame, not the second (blue) one"


def test_decode_image_transparent_rgba_pixels_become_white():
    source = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black
    source.putpixel((1, 1), (255, 0, 0, 255))  # one opaque red pixel
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    image = decode_image(buffer.getvalue(), max_pixels=10**6)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (255, 0, 0)


def test_decode_image_applies_exif_orientation():
    source = Image.new("RGB", (40, 20), RED)
    exif = source.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), max_pixels=10**6).size == (20, 40)


def test_decode_image_refuses_tiff_naming_the_supported_formats():
    with pytest.raises(MediaError) as error:
        decode_image(image_bytes("TIFF"), max_pixels=10**6)
    assert "TIFF" in error.value.message
    for name in ("PNG", "JPEG", "WebP", "GIF", "BMP"):
        assert name in error.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_truncated_file_is_corrupt_or_truncated(fmt):
    data = image_bytes(fmt, (200, 200))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], max_pixels=10**6)


def test_decode_image_random_bytes_are_refused():
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(np.random.default_rng(0).bytes(4096), max_pixels=10**6)


def test_decode_image_over_max_pixels_is_refused_before_decoding(monkeypatch):
    loads = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))
    with pytest.raises(MediaError) as error:
        decode_image(solid_png(5000, 5000), max_pixels=1_000_000)
    assert "25000000" in error.value.message and "1000000" in error.value.message
    assert loads == [], "the pixels must not be decoded"


def test_decode_image_header_claiming_too_many_pixels_is_refused_without_pixel_data():
    # Had it tried to decode, the missing pixel data would read as "corrupt or truncated".
    with pytest.raises(MediaError, match="the limit is 1000000"):
        decode_image(solid_png(5000, 5000, idat=False), max_pixels=1_000_000)


def test_decode_image_beyond_pillows_own_bomb_cap_names_the_pixel_limit():
    # 400M pixels trips Pillow's DecompressionBombError at open: still a pixel-limit message.
    with pytest.raises(MediaError, match="more pixels than the limit of 40000000"):
        decode_image(solid_png(20000, 20000, idat=False), max_pixels=40_000_000)


# ---- decode_video ----


def test_video_frames_over_the_pixel_or_byte_budget_are_decoded_downscaled():
    data = video_bytes("mp4", frames=20, size=(640, 480))
    full = decode_video(data, fps=10.0, max_frames=20, max_duration_s=600)
    assert full.frames.shape[1:3] == (480, 640)
    small_frames = decode_video(data, fps=10.0, max_frames=20, max_duration_s=600, max_frame_pixels=160 * 120)
    assert small_frames.frames.shape[1] * small_frames.frames.shape[2] <= 160 * 120
    budget = full.frames.nbytes // 5
    few_bytes = decode_video(data, fps=10.0, max_frames=20, max_duration_s=600, max_decoded_bytes=budget)
    assert few_bytes.frames.nbytes <= budget and len(few_bytes.frames) == len(full.frames)
    assert few_bytes.frames[:, :, :, 0].mean() > 0, "still the video's own frames"


@pytest.mark.parametrize("container", list(VIDEO_FORMATS))
def test_decode_video_samples_at_the_requested_fps_spread_evenly(container):
    require_encoder(container)
    video = decode_video(video_bytes(container), fps=2.0, max_frames=32, max_duration_s=600)
    assert video.total_num_frames == 20
    assert video.fps == pytest.approx(10.0)
    assert video.duration == pytest.approx(2.0)
    assert len(video.frame_indices) == math.ceil(2.0 * 2) == 4
    assert video.frame_indices == [0, 6, 13, 19]
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    # The decoded frames are the ones named by frame_indices (red level 12 * index).
    reds = [int(frame[..., 0].mean()) for frame in video.frames]
    assert reds == pytest.approx([12 * i for i in video.frame_indices], abs=8)


def test_decode_video_max_frames_caps_the_sample():
    video = decode_video(video_bytes("mp4"), fps=8.0, max_frames=3, max_duration_s=600)
    assert video.frame_indices == [0, 10, 19]
    assert video.frames.shape[0] == 3


def test_decode_video_longer_than_max_duration_is_refused_naming_the_limit():
    with pytest.raises(MediaError, match=r"2\.0 s long; the limit is 1\.5 s"):
        decode_video(video_bytes("mp4"), fps=2.0, max_frames=32, max_duration_s=1.5)


@pytest.mark.parametrize("container, keep, decodes", [
    # An mp4 keeps its index at the end: cut anywhere, it cannot be decoded.
    *(("mp4", keep, False) for keep in (0.05, 0.25, 0.5, 0.62, 0.75, 0.9)),
    # A Matroska file cut late still yields the frames before the cut.
    *(("mkv", keep, False) for keep in (0.05, 0.25, 0.5, 0.62)), ("mkv", 0.75, True), ("mkv", 0.9, True),
])
def test_decode_video_truncated_file_is_a_media_error_or_its_frames_before_the_cut(container, keep, decodes):
    # Before the fix, decord's DECORDError (not a RuntimeError) escaped here: a 500, not a 400.
    data = video_bytes(container)
    truncated = data[: int(len(data) * keep)]
    if not decodes:
        with pytest.raises(MediaError, match="corrupt or truncated"):
            decode_video(truncated, fps=2.0, max_frames=32, max_duration_s=600)
        return
    video = decode_video(truncated, fps=2.0, max_frames=32, max_duration_s=600)
    assert 0 < video.total_num_frames < 20, "only the frames before the cut"


def test_decode_video_non_video_bytes_are_an_unsupported_format():
    with pytest.raises(MediaError, match="Unsupported video format"):
        decode_video(image_bytes("PNG"), fps=2.0, max_frames=32, max_duration_s=600)


# ---- read_data_url ----


def test_read_data_url_returns_the_decoded_bytes():
    assert read_data_url(data_url(b"\x00\x01hello", "image/png"), "image", 1024) == b"\x00\x01hello"


@pytest.mark.parametrize("url", ["data:image/png,rawbytes", "data:image/png;charset=utf-8,abc", "data:nocomma"])
def test_read_data_url_that_is_not_base64_is_refused(url):
    with pytest.raises(MediaError, match="must be base64"):
        read_data_url(url, "image", 1024)


def test_read_data_url_with_bad_base64_is_refused():
    with pytest.raises(MediaError, match="not valid base64"):
        read_data_url("data:image/png;base64,@@not*base64@@", "image", 1024)


def test_read_data_url_oversize_is_413_before_decoding():
    # The payload is not even valid base64: the size check must refuse it first.
    with pytest.raises(PayloadTooLargeError) as error:
        read_data_url("data:image/png;base64," + "@" * (4 * MiB), "image", MiB)
    assert error.value.status_code == 413
    assert "1 MiB" in error.value.message


@pytest.mark.parametrize("size", [998, 999, 1000])
def test_read_data_url_at_exactly_the_limit_is_accepted_whatever_its_padding(size):
    data = bytes(range(256)) * 4
    assert read_data_url(data_url(data[:size], "image/png"), "image", size) == data[:size]
    with pytest.raises(PayloadTooLargeError, match=f"{size - 1} byte limit"):
        read_data_url(data_url(data[:size], "image/png"), "image", size - 1)


# ---- read_local ----


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "inside.png").write_bytes(b"inside")
    (tmp_path / "outside.png").write_bytes(b"outside")
    return root


def test_read_local_is_off_without_a_media_dir_and_says_how_to_turn_it_on(media_root):
    with pytest.raises(MediaRefusedError, match="media.local_media_dir"):
        read_local(str(media_root / "inside.png"), "image", MiB, None)


def test_read_local_reads_a_file_inside_the_dir_by_relative_and_absolute_path(media_root):
    assert read_local("inside.png", "image", MiB, str(media_root)) == b"inside"
    assert read_local(str(media_root / "inside.png"), "image", MiB, str(media_root)) == b"inside"


def test_read_local_reads_a_file_url_inside_the_dir(media_root):
    assert read_local((media_root / "inside.png").as_uri(), "image", MiB, str(media_root)) == b"inside"


@pytest.mark.parametrize("path", ["../outside.png", "{root}/../outside.png", "{tmp}/outside.png", "/etc/hostname"])
def test_read_local_path_outside_the_dir_is_refused(media_root, path):
    path = path.format(root=media_root, tmp=media_root.parent)
    with pytest.raises(MediaRefusedError, match="outside the media directory"):
        read_local(path, "image", MiB, str(media_root))


def test_read_local_file_url_outside_the_dir_is_refused(media_root):
    with pytest.raises(MediaRefusedError, match="outside the media directory"):
        read_local((media_root.parent / "outside.png").as_uri(), "image", MiB, str(media_root))


def test_read_local_symlink_inside_pointing_outside_is_refused(media_root):
    (media_root / "link.png").symlink_to(media_root.parent / "outside.png")
    with pytest.raises(MediaRefusedError, match="outside the media directory"):
        read_local("link.png", "image", MiB, str(media_root))


def test_read_local_missing_file_is_a_media_error(media_root):
    with pytest.raises(MediaError, match="No such image file"):
        read_local("missing.png", "image", MiB, str(media_root))


def test_read_local_file_over_max_bytes_is_413(media_root):
    (media_root / "big.png").write_bytes(b"x" * (MiB + 1))
    with pytest.raises(PayloadTooLargeError):
        read_local("big.png", "image", MiB, str(media_root))


# ---- fetch: a real HTTP server on 127.0.0.1 ----

PNG = image_bytes("PNG")
BIG = b"x" * (2 * MiB)


@pytest.fixture(scope="module")
async def media_server():
    """Base URL of a local server; `hits` lists the paths it was asked for."""
    hits: list[str] = []

    async def img(_request):
        return web.Response(body=PNG, content_type="image/png")

    async def big(_request):
        return web.Response(body=BIG, content_type="image/png")

    async def big_chunked(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(BIG), 64 * 1024):
            await response.write(BIG[start:start + 64 * 1024])
        await response.write_eof()
        return response

    async def big_stalled(request):
        # Declares 2 MB, then sends nothing for 3 s: only the Content-Length can refuse it quickly.
        response = web.StreamResponse()
        response.content_length = len(BIG)
        await response.prepare(request)
        await asyncio.sleep(3)
        await response.write(BIG)
        return response

    async def redirect_loop(_request):
        raise web.HTTPFound("/redirect-loop")

    async def redirect_once(_request):
        raise web.HTTPFound("/img")

    async def redirect_ftp(_request):
        raise web.HTTPFound("ftp://127.0.0.1/img")

    async def redirect_private(request):
        raise web.HTTPFound(f"http://{request.query['to']}:{request.url.port}/img")

    async def slow(_request):
        await asyncio.sleep(3)
        return web.Response(body=PNG, content_type="image/png")

    @web.middleware
    async def record(request, handler):
        hits.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in (("/img", img), ("/big", big), ("/big-chunked", big_chunked),
                          ("/big-stalled", big_stalled),
                          ("/redirect-loop", redirect_loop), ("/redirect-once", redirect_once),
                          ("/redirect-ftp", redirect_ftp), ("/redirect-private", redirect_private),
                          ("/slow", slow)):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server = type("Server", (), {"url": f"http://127.0.0.1:{port}", "port": port, "hits": hits})
    yield server
    await runner.cleanup()


LOCAL = MediaConfig(allow_remote=True, allow_private_addresses=True, max_redirects=2, read_timeout_s=0.5)
GUARDED = LOCAL.model_copy(update={"allow_private_addresses": False})


async def test_fetch_returns_the_body(media_server):
    assert await fetch(f"{media_server.url}/img", "image", MiB, LOCAL) == PNG


async def test_fetch_follows_a_redirect(media_server):
    assert await fetch(f"{media_server.url}/redirect-once", "image", MiB, LOCAL) == PNG


async def test_fetch_redirect_loop_stops_after_max_redirects(media_server):
    media_server.hits.clear()
    with pytest.raises(MediaError, match="redirected more than 2 times"):
        await fetch(f"{media_server.url}/redirect-loop", "image", MiB, LOCAL)
    assert media_server.hits == ["/redirect-loop"] * 3  # the first request and 2 redirects


async def test_fetch_redirect_to_another_scheme_is_refused(media_server):
    with pytest.raises(MediaRefusedError, match="must be http"):
        await fetch(f"{media_server.url}/redirect-ftp", "image", MiB, LOCAL)


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_fetch_body_over_max_bytes_is_413_with_or_without_content_length(media_server, path):
    with pytest.raises(PayloadTooLargeError) as error:
        await fetch(f"{media_server.url}{path}", "image", MiB, LOCAL)
    assert error.value.status_code == 413
    # The same bodies are fine under a larger cap: the refusal is the size, not the route.
    assert await fetch(f"{media_server.url}{path}", "image", 3 * MiB, LOCAL) == BIG


async def test_fetch_declared_content_length_over_max_is_413_before_reading_the_body(media_server):
    started = time.monotonic()
    with pytest.raises(PayloadTooLargeError):
        await fetch(f"{media_server.url}/big-stalled", "image", MiB, LOCAL)
    assert time.monotonic() - started < 2.5, "refused on the header, without waiting for the 3 s stalled body"


async def test_fetch_server_slower_than_the_read_timeout_fails_fast(media_server):
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"Fetching the image URL timed out \(limits: connect 5 s, between reads 0.5 s"):
        await fetch(f"{media_server.url}/slow", "image", MiB, LOCAL)
    assert time.monotonic() - started < 2.5, "the 0.5 s read timeout, not the server's 3 s sleep, ended it"


async def test_fetch_http_error_status_is_a_media_error(media_server):
    with pytest.raises(MediaError, match="HTTP 404"):
        await fetch(f"{media_server.url}/missing", "image", MiB, LOCAL)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_fetch_private_or_local_address_is_refused_without_a_request(media_server, host):
    media_server.hits.clear()
    with pytest.raises(MediaRefusedError, match="private or local address"):
        await fetch(f"http://{host}:{media_server.port}/img", "image", MiB, GUARDED)
    assert media_server.hits == []


@pytest.mark.parametrize("target", ["127.0.0.2", "[::1]", "169.254.169.254", "10.0.0.1"])
async def test_a_redirect_to_a_private_address_is_refused_before_it_is_requested(media_server, monkeypatch, target):
    # The test server is on loopback: count 127.0.0.1 as public, so that the first hop passes the guard as a
    # public server's would, and the redirect is what the guard must catch.
    real = media._is_public
    monkeypatch.setattr(media, "_is_public", lambda address: address == "127.0.0.1" or real(address))
    assert await fetch(f"{media_server.url}/img", "image", MiB, GUARDED) == PNG  # precondition: first hop allowed
    media_server.hits.clear()
    with pytest.raises(MediaRefusedError, match="private or local address"):
        await fetch(f"{media_server.url}/redirect-private?to={target}", "image", MiB, GUARDED)
    assert media_server.hits == ["/redirect-private"]


async def test_fetch_is_off_when_allow_remote_is_false(media_server):
    config = LOCAL.model_copy(update={"allow_remote": False})
    with pytest.raises(MediaRefusedError, match="Fetching image URLs is off"):
        await fetch(f"{media_server.url}/img", "image", MiB, config)


async def test_fetch_outside_allowed_domains_is_refused_naming_the_setting(media_server):
    config = LOCAL.model_copy(update={"allowed_domains": ["example.com"]})
    with pytest.raises(MediaRefusedError, match="localhost is not in media.allowed_domains"):
        await fetch(f"http://localhost:{media_server.port}/img", "image", MiB, config)
    allowed = LOCAL.model_copy(update={"allowed_domains": ["localhost"]})
    assert await fetch(f"http://localhost:{media_server.port}/img", "image", MiB, allowed) == PNG


async def test_fetch_of_a_non_http_scheme_is_refused():
    with pytest.raises(MediaRefusedError, match="must be http"):
        await fetch("ftp://127.0.0.1/img.png", "image", MiB, LOCAL)


# ---- MediaLoader ----


async def test_loader_refuses_an_unsupported_url_scheme():
    loader = MediaLoader(LOCAL)
    part = VideoPart.model_validate({"type": "video_url", "video_url": {"url": "ftp://example.com/v.mp4"}})
    with pytest.raises(MediaRefusedError, match="Unsupported video URL scheme 'ftp'"):
        await loader.load(part)


async def test_loader_clamps_requested_fps_and_max_frames_to_the_server_caps():
    url = data_url(video_bytes("mp4"), "video/mp4")  # 2.0 s, 20 frames

    async def sampled(config: MediaConfig, **request) -> list[int]:
        part = VideoPart.model_validate({"type": "video_url", "video_url": {"url": url, **request}})
        return (await MediaLoader(config).load(part)).frame_indices

    # fps 100 asked, cap 2 fps: ceil(2.0 s * 2) = 4 frames, not all 20.
    assert len(await sampled(MediaConfig(video_fps_cap=2.0), fps=100, max_frames=1000)) == 4
    # max_frames 1000 asked, cap 3 frames.
    assert len(await sampled(MediaConfig(max_video_frames=3), fps=8, max_frames=1000)) == 3
    # Under the caps the request is honoured.
    assert len(await sampled(MediaConfig(), fps=1, max_frames=32)) == 2


async def test_a_resent_data_url_is_decoded_once_within_the_ttl_and_per_options(monkeypatch):
    from deployments.ingress import media as media_module

    decoded = []
    real = media_module.decode_image
    monkeypatch.setattr(media_module, "decode_image", lambda *args: decoded.append(1) or real(*args))
    loader = MediaLoader(MediaConfig(decoded_cache_ttl_s=60))
    png = ImagePart.model_validate({"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG"), "image/png")}})
    first, second = await loader.load(png), await loader.load(png)
    assert second is first and len(decoded) == 1 and (loader.decoded.hits, loader.decoded.misses) == (1, 1)
    other = ImagePart.model_validate({"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG", color=(0, 0, 9)),
                                                                                         "image/png")}})
    assert (await loader.load(other)).getpixel((0, 0)) == (0, 0, 9) and len(decoded) == 2
    url = data_url(video_bytes("mp4"), "video/mp4")
    clips = [VideoPart.model_validate({"type": "video_url", "video_url": {"url": url, "max_frames": n}}) for n in (2, 3, 2)]
    frames = [len((await loader.load(clip)).frames) for clip in clips]
    assert frames == [2, 3, 2] and (loader.decoded.hits, loader.decoded.misses) == (2, 4), "options are in the key"


async def test_the_decoded_cache_expires_and_can_be_off():
    png = ImagePart.model_validate({"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG"), "image/png")}})
    expiring = MediaLoader(MediaConfig(decoded_cache_ttl_s=0.05))
    first = await expiring.load(png)
    await asyncio.sleep(0.1)
    assert await expiring.load(png) is not first, "past the ttl it is decoded again"
    off = MediaLoader(MediaConfig(decoded_cache_bytes=0))
    assert await off.load(png) is not await off.load(png) and len(off.decoded) == 0


def test_a_file_that_crashes_decord_costs_a_worker_not_the_process():
    from deployments.ingress.media import VideoDecoder

    decoder = VideoDecoder(workers=1)
    crashing = (Path(__file__).resolve().parents[1] / "data" / "decord-crash.avi").read_bytes()
    with pytest.raises(MediaError, match="crashed"):
        decoder.decode(crashing, fps=2, max_frames=8, max_duration_s=60)
    video = decoder.decode(video_bytes("mp4"), fps=2, max_frames=8, max_duration_s=60)
    assert video.frames.shape[0] == 4


def test_transparency_by_colour_key_is_composited_on_white():
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=(10, 20, 30))
    assert decode_image(buffer.getvalue(), 10_000).getpixel((0, 0)) == (255, 255, 255)


async def test_the_videos_of_one_request_share_the_decoded_bytes_budget():
    budget = 2 * MiB
    config = LOCAL.model_copy(update={"max_video_decoded_bytes": budget})
    url = data_url(video_bytes("mp4", frames=20, size=(640, 480)), "video/mp4")
    part = VideoPart.model_validate({"type": "video_url", "video_url": {"url": url, "fps": 10}})
    alone = await MediaLoader(config).load(part)
    shared = await MediaLoader(config).load(part, videos_in_request=2)
    assert alone.frames.nbytes <= budget and shared.frames.nbytes <= budget // 2
    assert len(shared.frames) == len(alone.frames) > 1, "downscaled, not fewer frames"


def test_a_decoded_image_carries_the_digest_of_its_pixels_whatever_its_metadata_says():
    from PIL import PngImagePlugin

    from deployments.common.digest import DIGEST_KEY, image_digest, stamp_image

    text = PngImagePlugin.PngInfo()
    text.add_text(DIGEST_KEY, "forged")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG", pnginfo=text)
    decoded = decode_image(buffer.getvalue(), 10_000)
    stamped = stamp_image(decoded)
    assert stamped.info == {DIGEST_KEY: image_digest(Image.new("RGB", (8, 8), (1, 2, 3)))}


def test_an_image_of_extreme_aspect_ratio_is_refused_before_decoding(monkeypatch):
    loads = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))
    with pytest.raises(MediaError, match="ratio is over the limit of 50 to 1"):
        decode_image(solid_png(100_000, 9, idat=False), max_pixels=10**7, max_aspect_ratio=50)
    assert loads == []
    assert decode_image(solid_png(450, 9), max_pixels=10**7, max_aspect_ratio=50).size == (450, 9)


async def test_a_requests_images_share_one_decoded_bytes_budget(monkeypatch):
    """Small files of big flat images: the images one request holds decoded are capped before each decodes."""
    config = MediaConfig(max_image_decoded_bytes=3 * 1000 * 1000 * 3)  # three 1000x1000 RGB images
    loader = MediaLoader(config)
    budget = ImageBudget(config.max_image_decoded_bytes)
    url = "data:image/png;base64," + base64.b64encode(solid_png(1000, 1000)).decode()
    part = ImagePart(type="image_url", image_url={"url": url})
    assert len(part.image_url.url) < 32_000, "a few KB each"
    for _ in range(3):
        assert (await loader.load(part, images=budget)).size == (1000, 1000)  # the decoded cache counts too
    with pytest.raises(MediaError, match="images decode to more than 9000000 bytes"):
        await loader.load(part, images=budget)
    assert (await loader.load(part)).size == (1000, 1000), "another request has a budget of its own"
