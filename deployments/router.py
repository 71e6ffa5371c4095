"""The ingress deployment: HTTP only. Validates, picks the variant, streams the answer back."""

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.access import AccessMiddleware, AccessPolicy, route_path, send_error
from deployments.config import ModelConfig, RouterArgs
from deployments.errors import BadRequestError, HTTPStatusError, OverloadedError, ServiceError, error_body
from deployments.handoff import MediaMissing, SentMedia
from deployments.media import MediaLoader
from deployments.metrics import CacheMetrics, RequestTrace, RouterMetrics, Status
from deployments.protocol import (
    CompletionStream, choose_variant, collect, error_event, parsed_tools, to_generation_request,
)
from deployments.schemas import ChatCompletionRequest, ModelCard, ModelList
from deployments.types import Chunk, GenerationRequest

logger = logging.getLogger("ray.serve")

app = FastAPI(title="MiniCPM-V 4.6 on Ray Serve", version="1.0")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHAT_PAGE = (Path(__file__).parent / "static" / "chat.html").read_text()
CHAT_PATH = "/v1/chat/completions"


async def _first(chunks: DeploymentResponseGenerator):
    """Await the first chunk so errors before any token still choose the HTTP status; when the client goes
    away meanwhile, stop the replica."""
    try:
        return await chunks.__anext__()
    except asyncio.CancelledError:
        _stop(chunks)
        raise
    except (BackPressureError, DeploymentUnavailableError) as exc:
        raise OverloadedError("The model is at capacity; retry shortly") from exc
    except StopAsyncIteration:
        raise ServiceError("The model stream ended before producing anything") from None
    except Exception as exc:
        raise _unwrap(exc) from exc


async def _observed(first: Chunk, chunks: DeploymentResponseGenerator, trace: RequestTrace) -> AsyncIterator[Chunk]:
    """The whole stream, first chunk included, recording token timing and usage in `trace`."""
    async for chunk in _prepend(first, chunks):
        if chunk.reasoning or chunk.content:
            trace.token()
        if chunk.usage:
            # The n choices of a request share its prompt.
            trace.prompt_tokens = chunk.usage.prompt_tokens
            trace.completion_tokens += chunk.usage.completion_tokens
            trace.finish_reason = chunk.finish_reason
        yield chunk


async def _prepend(first: Chunk, chunks: DeploymentResponseGenerator) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in chunks:
        yield chunk


async def _sse(first: Chunk, chunks: DeploymentResponseGenerator, stream: CompletionStream,
               trace: RequestTrace) -> AsyncIterator[str]:
    """SSE lines; errors after the 200 travel in the stream; `[DONE]` ends it exactly once."""
    try:
        async for chunk in _observed(first, chunks, trace):
            for event in stream.events(chunk):
                yield event
    except Exception as exc:
        error = _unwrap(exc)
        trace.status = _status(error)
        logger.exception("Request %s failed mid-stream", stream.request_id)
        yield error_event(error, stream.request_id)
    except BaseException:  # the client went away: CancelledError / GeneratorExit
        trace.status = "cancelled"
        raise
    finally:
        # Client gone or done: make sure the replica stops generating.
        _stop(chunks)
        _finish(trace)
    yield "data: [DONE]\n\n"


def _stop(chunks: DeploymentResponseGenerator) -> None:
    """Cancel the replica's generation. Best effort: `cancel()` re-raises the error of a request that
    never reached a replica (backpressure), which has nothing to stop."""
    with contextlib.suppress(Exception):
        chunks.cancel()


@functools.cache
def _metrics() -> RouterMetrics:
    # Created on first use, inside the router replica's process, where Ray exports them.
    return RouterMetrics()


def _finish(trace: RequestTrace) -> None:
    """Report a request's metrics and write its one log line (never the prompt), once."""
    if trace.reported:
        return
    fields = trace.report(_metrics())
    logger.info("Request %s finished: %s", trace.request_id, " ".join(f"{k}={v}" for k, v in fields.items()))


def _status(error: ServiceError) -> Status:
    if isinstance(error, OverloadedError):
        return "rejected"
    return "client_error" if error.status_code < 500 else "server_error"


def _unwrap(exc: BaseException) -> ServiceError:
    """The ServiceError behind an exception (Ray wraps replica errors), else a generic one."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, ServiceError):
            return candidate
    return ServiceError("Internal error")


# ---- one place maps every error to a status and the OpenAI error shape ----

class RequestIdMiddleware:
    """Puts the request id in `request.state`: the X-Request-Id the request arrived with, else a new one.

    Serve's proxy fills X-Request-Id before us (the client's, or one it makes up), logs under it and
    always returns it in the response, so that id is the request's id here too, whatever the client
    sent: header, body, error bodies and log lines then all agree. (Header values cannot hold line
    breaks, and every place the id goes escapes it.) The header is only added here when it was
    missing, which happens without Serve's proxy. Pure ASGI rather than `@app.middleware`,
    which would buffer streams and hide disconnects.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["trace"] = RequestTrace(request_id, arrival=time.perf_counter())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start" and not incoming:
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AdmissionMiddleware:
    """Caps the chat requests one router replica serves at once (`router.deployment.max_ongoing_requests`):
    past the cap a request gets a 503 with `Retry-After` in the API's error shape at once, counted as
    `rejected`. A stream counts until its last byte.

    Serve's own cap for the router replica is set above this one (`RouterArgs.serve_options`): past
    Serve's cap its proxy answers a plain-text 503 without `Retry-After`, which clients cannot act on.
    Runs before the access checks read a chunked body, so an overloaded router reads no bodies.
    """

    def __init__(self, app, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy
        self.ongoing = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) != CHAT_PATH:
            return await self.app(scope, receive, send)
        if self.ongoing >= self.policy.max_ongoing_chats:
            trace = scope["state"]["trace"]
            trace.status = "rejected"
            _finish(trace)
            error = OverloadedError(f"The router is at capacity ({self.policy.max_ongoing_chats} requests at once); "
                                    "retry shortly")
            return await send_error(scope, send, error, self.policy.cors_origins)
        self.ongoing += 1
        try:
            await self.app(scope, receive, send)
        finally:
                self.ongoing -= 1


# One router per process: its __init__ configures this policy, the middlewares read it.
ACCESS = AccessPolicy()
app.add_middleware(AccessMiddleware, policy=ACCESS)
app.add_middleware(AdmissionMiddleware, policy=ACCESS)
app.add_middleware(RequestIdMiddleware)  # added last: outermost, so even a 401 or a 503 carries an id


def _error_response(request: Request, error: ServiceError, headers: dict | None = None) -> JSONResponse:
    body = error_body(error, getattr(request.state, "request_id", None))
    return JSONResponse(body, status_code=error.status_code, headers=headers)


@app.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    trace = getattr(request.state, "trace", None)
    if trace is not None and request.url.path.endswith(CHAT_PATH):
        trace.status = _status(exc)
        _finish(trace)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
    return _error_response(request, exc, headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return await _service_error(request, BadRequestError("The request body is not valid JSON"))
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    return await _service_error(request, BadRequestError(f"{param or 'body'}: {first['msg']}", param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = HTTPStatusError(str(exc.detail))
    error.status_code, error.code = exc.status_code, f"http_{exc.status_code}"
    return _error_response(request, error, headers=exc.headers)


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error in request %s", getattr(request.state, "request_id", None))
    return await _service_error(request, _unwrap(exc))


# Defined last: serve.ingress captures the app with its middleware and handlers as they are now.
@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, variants: dict[str, ModelConfig], handles: dict[str, DeploymentHandle], args: RouterArgs):
        self._variants = variants
        self._handles = {variant: handle.options(stream=True) for variant, handle in handles.items()}
        self._args = args
        ACCESS.configure(args.api_key, args.api_key_env, args.cors_origins, args.max_body_bytes,
                         args.max_ongoing_chats)
        self._media = MediaLoader(args.media, _metrics().media_decode, CacheMetrics("router", ("decoded",)).observe)
        self._sent = SentMedia()

    async def _start(self, config: ModelConfig, request: GenerationRequest
                     ) -> tuple[DeploymentResponseGenerator, Chunk]:
        """Call the variant's deployment and await the first chunk. Images and videos this router handed to
        that deployment before go by reference (`deployments.handoff`); when the replica lacks one, the
        request goes again with every item in full."""
        handle, variant = self._handles[config.variant], config.variant
        light = self._sent.by_reference(variant, request) if config.media_store_bytes else None
        chunks = None
        if light is not None:
            chunks = handle.stream.remote(light)
            first = await _first(chunks)
            if isinstance(first, MediaMissing):  # that stream ended with it
                self._sent.forget(variant, request)
                chunks = None
        if chunks is None:
            chunks = handle.stream.remote(request)
            first = await _first(chunks)
        if config.media_store_bytes:
            self._sent.remember(variant, request)  # the replica holds them all now
        return chunks, first

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page(self) -> str:
        """The web chat page: self-contained, talks to /v1/chat/completions like any client."""
        return CHAT_PAGE

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness of the router; touches no model."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=config.name) for config in self._variants.values()])

    @app.post(CHAT_PATH)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        request_id, trace = request.state.request_id, request.state.trace
        config, thinking = choose_variant(body, self._variants)
        trace.variant = config.variant
        generation_request = await to_generation_request(body, thinking, request_id, self._args, self._media.load)
        chunks, first = await self._start(config, generation_request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = CompletionStream(request_id, config.name, include_usage, body.n, parsed_tools(body))
            events = _sse(first, chunks, stream, trace)
            return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            completion = await collect(_observed(first, chunks, trace), request_id, config.name, body.n,
                                       parsed_tools(body))
        except asyncio.CancelledError:
            trace.status = "cancelled"
            _finish(trace)
            raise
        finally:
            _stop(chunks)  # no-op once the stream ended; stops generation when the client went away
        _finish(trace)  # errors are reported by the error handlers, with their status
        return completion
