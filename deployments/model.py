"""The model deployment: a thin Ray Serve shell over `Engine` (one per replica)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from deployments.config import ModelConfig
from deployments.engine import Engine
from deployments.types import Chunk, GenerationRequest


@serve.deployment
class ModelDeployment:
    """Loads one checkpoint and streams generations from it."""

    def __init__(self, config: ModelConfig) -> None:
        self.engine = Engine(config)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield the engine's chunks; cancellation by the caller stops generation."""
        async for chunk in self.engine.stream(request):
            yield chunk

    def running_generations(self) -> int:
        """Generation threads alive in this replica (tests use it to prove cancellation)."""
        return self.engine.running
