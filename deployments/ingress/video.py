"""Video decoding with decord, isolated in worker processes.

Kept apart from the rest of the media code so that worker processes import only what decoding
needs (decord, numpy), not torch, transformers or Ray.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import decord
import numpy as np

from deployments.common.errors import MediaError
from deployments.common.types import Video

VIDEO_SIGNATURES = {"mp4/mov": (4, b"ftyp"), "webm/mkv": (0, b"\x1a\x45\xdf\xa3"), "avi": (8, b"AVI ")}


def decode_video(data: bytes, fps: float, max_frames: int, max_duration_s: float,
                 max_frame_pixels: int = 1920 * 1080, max_decoded_bytes: int = 128 * 1024 * 1024) -> Video:
    """Decode with decord, sampling frames at `fps` (at most `max_frames`, spread evenly).

    Frames are decoded downscaled when they are over `max_frame_pixels`, or when all sampled frames
    together would be over `max_decoded_bytes` (a small file can hold huge frames).
    """
    if not any(data[offset:offset + len(magic)] == magic for offset, magic in VIDEO_SIGNATURES.values()):
        raise MediaError("Unsupported video format: use MP4, MOV, WebM, MKV or AVI")
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        total = len(reader)
        if total == 0:
            raise MediaError("The video has no frames")
        source_fps = float(reader.get_avg_fps()) or 1.0
        duration = total / source_fps
        if duration > max_duration_s:
            raise MediaError(f"The video is {duration:.1f} s long; the limit is {max_duration_s:g} s")
        count = max(1, min(max_frames, math.ceil(duration * fps), total))
        indices = np.linspace(0, total - 1, count).round().astype(int).tolist()
        height, width = reader[0].shape[:2]
        pixels = min(max_frame_pixels, max_decoded_bytes // (3 * count))
        if width * height > pixels:
            scale = math.sqrt(pixels / (width * height))
            width, height = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1, width=width, height=height)
        frames = reader.get_batch(indices).asnumpy()
    except (RuntimeError, ValueError, IndexError, decord.DECORDError):  # decord's errors for broken input
        raise MediaError("The video could not be decoded: the file is corrupt or truncated") from None
    return Video(frames=frames, fps=source_fps, duration=duration, frame_indices=indices, total_num_frames=total)


class VideoDecoder:
    """Runs `decode_video` in worker processes.

    decord's native code can crash the whole process on some corrupt files (seen: a damaged
    AVI, segmentation fault in VideoReader's constructor). In a worker that costs one worker,
    which is replaced, instead of the router and every stream it carries.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def decode(self, data: bytes, fps: float, max_frames: int, max_duration_s: float,
               max_frame_pixels: int = 1920 * 1080, max_decoded_bytes: int = 128 * 1024 * 1024) -> Video:
        """Blocking; call from a thread. Raises MediaError, also when the worker crashed."""
        pool = self._current_pool()
        try:
            return pool.submit(decode_video, data, fps, max_frames, max_duration_s, max_frame_pixels,
                               max_decoded_bytes).result()
        except BrokenProcessPool:
            self._replace(pool)
            raise MediaError("The video could not be decoded: the decoder crashed on this file") from None

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the router process runs threads and an event loop.
                self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)
