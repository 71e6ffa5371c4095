"""Digests of decoded pixels: the identity of an image or video for the caches (no torch: the router
computes them once per decode, the replica only when the router did not).

The digest is cryptographic (no client can make two different pictures collide) and covers the
pixels after decoding, so two encodings of the same picture share it.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from deployments.common.types import Video

# Where a decoded image carries its digest. The router sets it after decoding (and clears everything a
# file's metadata put in `info`), so a client cannot choose it.
DIGEST_KEY = "minicpm.digest"


def image_digest(image: Image.Image) -> bytes:
    """Digest of an image's pixels (mode and size included); the one the router attached, if any."""
    known = image.info.get(DIGEST_KEY)
    if isinstance(known, bytes):
        return known
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.digest()[:16]


def video_digest(video: Video) -> bytes:
    """Digest of a video's sampled frames (their shape included); the one the router attached, if any."""
    if video.digest:
        return video.digest
    return frames_digest(video.frames)


def frames_digest(frames: np.ndarray) -> bytes:
    """Digest of an array of frames (shape and dtype included)."""
    frames = np.ascontiguousarray(frames)
    h = hashlib.sha256()
    h.update(f"{frames.shape}:{frames.dtype}".encode())
    h.update(memoryview(frames).cast("B"))
    return h.digest()[:16]


def stamp_image(image: Image.Image) -> Image.Image:
    """Drop the file's metadata from a decoded image and attach the digest of its pixels."""
    image.info = {}
    image.info[DIGEST_KEY] = image_digest(image)
    return image


def stamp_video(video: Video) -> Video:
    video.digest = b""
    video.digest = video_digest(video)
    return video
