"""The model deployment: a thin Ray Serve shell over `Engine` (one per replica)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import psutil

from ray import serve

from deployments.config import ModelConfig
from deployments.handoff import MediaMissing, MediaStore
from deployments.lru import BoundedCache
from deployments.metrics import CacheMetrics, active_streams_gauge, batch_rows_gauge
from deployments.types import Chunk, GenerationRequest

if TYPE_CHECKING:  # the module imports torch, which the router's process never loads
    from deployments.compiled import CompiledForward


@serve.deployment
class ModelDeployment:
    """Loads one checkpoint and streams generations from it."""

    def __init__(self, config: ModelConfig) -> None:
        # Imported here: the router's process imports this module too (through serve_app) and must not
        # need torch or transformers.
        from deployments.engine import Engine

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
        """This replica's process id, resident memory, running sequences, the rows in its batch after each of
        the last 100 admissions, for the last 100 rows cancelled while generating the decode steps each
        took to leave the batch, its caches' bytes, hits and misses (and answers carried into the prefix cache;
        the media store's hits and misses are the images and videos sent by reference),
        and how its decode steps and resumed prefills run (compiled or eager); for operators, tests and
        benchmarks."""
        core, config = self.engine.core, self.engine.config
        info = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss, "running": self.engine.running,
                "batch_sizes": list(core.batch_sizes), "cancel_lags": list(core.cancel_lags),
                "cancelled_rows": core.cancelled_rows,
                "prefix_cache": {**_cache_state(core.prefix_cache), "answers_carried": core.answers_carried},
                "vision_cache": _cache_state(core.vision_cache),
                "decode": {**_compile_state(core.step, config.compile_decode), "steps": core.decode_steps,
                           "compiled_steps": core.step.compiled_steps},
                "resumed_prefill": {**_compile_state(core.suffix, config.compile_resumed_prefill),
                                    "compiled_calls": core.suffix.compiled_calls}}
        for name, cache in (("processor_cache", self.engine.processor_cache), ("media_store", self.media)):
            if cache.enabled:
                info[name] = _cache_state(cache)
        return info


def _cache_state(cache: BoundedCache) -> dict:
    return {"bytes": cache.bytes, "hits": cache.stats[0], "misses": cache.stats[1]}


def _compile_state(forward: CompiledForward, on: bool) -> dict:
    return {"compile": on, "compiled": forward.compiled, "compile_s": forward.warm_up_s,
            "compile_error": repr(forward.error) if forward.error else None}
