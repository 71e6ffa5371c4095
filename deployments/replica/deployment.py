"""The model deployment: a thin Ray Serve shell over `Engine` (one per replica)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import psutil

from ray import serve

from deployments.common.config import ModelConfig
from deployments.common.handoff import MediaMissing, MediaStore
from deployments.common.lru import cache_state
from deployments.common.metrics import CacheMetrics, active_streams_gauge, batch_rows_gauge
from deployments.common.types import Chunk, GenerationRequest



@serve.deployment
class ModelDeployment:
    """Loads one checkpoint and streams generations from it."""

    def __init__(self, config: ModelConfig) -> None:
        # Imported here: the router's process imports this module too (through serve_app) and must not
        # need torch or transformers.
        from deployments.engine.engine import Engine

        self._tags = {"variant": config.variant}
        batch_rows = batch_rows_gauge()
        caches = CacheMetrics(config.variant, ("prefix", "vision", "processor", "media"))
        self.engine = Engine(config, on_batch_rows=lambda rows: batch_rows.set(rows, tags=self._tags),
                             on_cache=caches.observe)
        self.media = MediaStore(config.media_store_bytes, caches.observe)
        self._active = 0
        self._active_gauge = active_streams_gauge()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk | MediaMissing]:
        """Yield the engine's chunks; cancellation by the caller stops generation. Only a MediaMissing when an
        image or video sent by reference is not held here (the router then resends the request in full)."""
        resolved = await asyncio.to_thread(self.media.resolve, request)  # a video's frames may be copied
        if isinstance(resolved, MediaMissing):
            yield resolved
            return
        request = resolved
        self._set_active(+1)
        try:
            async for chunk in self.engine.stream(request):
                yield chunk
        finally:
            self._set_active(-1)

    def _set_active(self, change: int) -> None:
        self._active += change
        self._active_gauge.set(self._active, tags=self._tags)

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising gets the replica replaced."""
        await self.engine.check_health()

    def running_generations(self) -> int:
        """Sequences generating or waiting in this replica (0 proves cancelled streams stopped)."""
        return self.engine.running

    def process_info(self) -> dict:
        """This replica's process id and resident memory, the engine's `stats()` (batch sizes, cancellation lags,
        caches, compiled forwards) and its media store's bytes, hits and misses (the images and videos sent by
        reference); for operators, tests and benchmarks."""
        info = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss, **self.engine.stats()}
        if self.media.enabled:
            info["media_store"] = cache_state(self.media)
        return info
