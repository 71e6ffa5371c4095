"""The ingress deployment: HTTP only. Validates, picks the variant, streams the answer back.

Its FastAPI app is built from the router's config when the replica starts (`deployments.ingress.app`);
this class holds the handles to the model deployments and answers the routes.
"""

import asyncio

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.common.config import ModelConfig, RouterArgs
from deployments.common.handoff import MediaMissing, SentMedia
from deployments.common.metrics import CacheMetrics
from deployments.common.types import Chunk, GenerationRequest
from deployments.ingress.app import build_ingress_app
from deployments.ingress.media import MediaLoader
from deployments.ingress.protocol import CompletionStream, choose_variant, collect, parsed_tools, to_generation_request
from deployments.ingress.schemas import ChatCompletionRequest, ModelCard, ModelList
from deployments.ingress.streaming import finish, first_chunk, observed, router_metrics, sse_lines, stop

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@serve.deployment
@serve.ingress()
class Router:
    def __init__(self, variants: dict[str, ModelConfig], handles: dict[str, DeploymentHandle], args: RouterArgs):
        self._variants = variants
        self._handles = {variant: handle.options(stream=True) for variant, handle in handles.items()}
        self._args = args
        self._app = build_ingress_app(self, args)  # here, so a bad access config fails the replica's start
        self._media = MediaLoader(args.media, router_metrics().media_decode,
                                  CacheMetrics("router", ("decoded",)).observe)
        self._sent = SentMedia()

    def __serve_build_asgi_app__(self):
        """Serve asks for the replica's ASGI app once the constructor ran."""
        return self._app

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=config.name) for config in self._variants.values()])

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        request_id, trace = request.state.request_id, request.state.trace
        config, thinking = choose_variant(body, self._variants)
        trace.variant = config.variant
        generation_request = await to_generation_request(body, thinking, request_id, self._args, self._media.load)
        chunks, first = await self._start(config, generation_request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = CompletionStream(request_id, config.name, include_usage, body.n, parsed_tools(body))
            events = sse_lines(first, chunks, stream, trace)
            return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            completion = await collect(observed(first, chunks, trace), request_id, config.name, body.n,
                                       parsed_tools(body))
        except asyncio.CancelledError:
            trace.status = "cancelled"
            finish(trace)
            raise
        finally:
            stop(chunks)  # no-op once the stream ended; stops generation when the client went away
        finish(trace)  # errors are reported by the error handlers, with their status
        return completion

    async def _start(self, config: ModelConfig, request: GenerationRequest
                     ) -> tuple[DeploymentResponseGenerator, Chunk]:
        """Call the variant's deployment and await the first chunk. Images and videos this router handed to
        that deployment before go by reference (`deployments.common.handoff`); when the replica lacks one, the
        request goes again with every item in full."""
        handle, variant = self._handles[config.variant], config.variant
        light = self._sent.by_reference(variant, request) if config.media_store_bytes else None
        chunks = None
        if light is not None:
            chunks = handle.stream.remote(light)
            first = await first_chunk(chunks)
            if isinstance(first, MediaMissing):  # that stream ended with it
                self._sent.forget(variant, request)
                chunks = None
        if chunks is None:
            chunks = handle.stream.remote(request)
            first = await first_chunk(chunks)
        if config.media_store_bytes:
            self._sent.remember(variant, request)  # the replica holds them all now
        return chunks, first
