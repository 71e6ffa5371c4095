"""The replica's chunk stream as the client receives it: the first chunk awaited before the HTTP status is
chosen, SSE lines with errors inside the stream after the 200, and one log line and metrics per request."""

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentResponseGenerator

from deployments.common.errors import OverloadedError, ServiceError
from deployments.common.metrics import RequestTrace, RouterMetrics, Status
from deployments.common.types import Chunk
from deployments.ingress.protocol import CompletionStream, error_event

logger = logging.getLogger("ray.serve")


async def first_chunk(chunks: DeploymentResponseGenerator):
    """Await the first chunk so errors before any token still choose the HTTP status; when the client goes
    away meanwhile, stop the replica."""
    try:
        return await chunks.__anext__()
    except asyncio.CancelledError:
        stop(chunks)
        raise
    except (BackPressureError, DeploymentUnavailableError) as exc:
        raise OverloadedError("The model is at capacity; retry shortly") from exc
    except StopAsyncIteration:
        raise ServiceError("The model stream ended before producing anything") from None
    except Exception as exc:
        raise unwrap(exc) from exc


async def observed(first: Chunk, chunks: DeploymentResponseGenerator, trace: RequestTrace) -> AsyncIterator[Chunk]:
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


async def sse_lines(first: Chunk, chunks: DeploymentResponseGenerator, stream: CompletionStream,
                    trace: RequestTrace) -> AsyncIterator[str]:
    """SSE lines; errors after the 200 travel in the stream; `[DONE]` ends it exactly once."""
    try:
        async for chunk in observed(first, chunks, trace):
            for event in stream.events(chunk):
                yield event
    except Exception as exc:
        error = unwrap(exc)
        trace.status = status_of(error)
        logger.exception("Request %s failed mid-stream", stream.request_id)
        yield error_event(error, stream.request_id)
    except BaseException:  # the client went away: CancelledError / GeneratorExit
        trace.status = "cancelled"
        raise
    finally:
        # Client gone or done: make sure the replica stops generating.
        stop(chunks)
        finish(trace)
    yield "data: [DONE]\n\n"


def stop(chunks: DeploymentResponseGenerator) -> None:
    """Cancel the replica's generation. Best effort: `cancel()` re-raises the error of a request that
    never reached a replica (backpressure), which has nothing to stop."""
    with contextlib.suppress(Exception):
        chunks.cancel()


@functools.cache
def router_metrics() -> RouterMetrics:
    # Created on first use, inside the router replica's process, where Ray exports them.
    return RouterMetrics()


def finish(trace: RequestTrace) -> None:
    """Report a request's metrics and write its one log line (never the prompt), once."""
    if trace.reported:
        return
    fields = trace.report(router_metrics())
    logger.info("Request %s finished: %s", trace.request_id, " ".join(f"{k}={v}" for k, v in fields.items()))


def status_of(error: ServiceError) -> Status:
    if isinstance(error, OverloadedError):
        return "rejected"
    return "client_error" if error.status_code < 500 else "server_error"


def unwrap(exc: BaseException) -> ServiceError:
    """The ServiceError behind an exception (Ray wraps replica errors), else a generic one."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, ServiceError):
            return candidate
    return ServiceError("Internal error")
