"""One error hierarchy for the service; the router maps it to HTTP in one place.

Messages are written for the client: they say what was wrong and how to fix it, and never
carry a stack trace or another library's exception text.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status_code = 500
    error_type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        # Positional args only: Ray pickles exceptions across processes by their args.
        super().__init__(message, param)
        self.message = message
        self.param = param


class BadRequestError(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class UnsupportedParameterError(BadRequestError):
    code = "unsupported_parameter"


class InvalidGrammarError(BadRequestError):
    """A JSON schema or tool definition that no grammar can be compiled from."""

    code = "invalid_schema"


class MediaError(BadRequestError):
    """An image or video that cannot be used: corrupt, unsupported, over a limit."""

    code = "invalid_media"


class MediaRefusedError(BadRequestError):
    """A media URL or path this server is configured not to read."""

    code = "media_refused"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ModelNotFoundError(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class OverloadedError(ServiceError):
    """No capacity now; the client should retry after `retry_after` seconds."""

    status_code = 503
    error_type = "overloaded_error"
    code = "overloaded"
    retry_after = 1


class NumericalError(ServiceError):
    """A row's logits held NaN or no finite value: a numerical failure of the model (a 500, as no
    valid request value can cause it)."""


class GrammarError(ServiceError):
    """A constrained row's grammar refused the token its own mask allowed: a bug, not the request's fault."""

    code = "constrained_decoding_failed"


def error_body(error: ServiceError, request_id: str | None) -> dict:
    """The OpenAI error shape for `error`, the one place every error response (JSON, SSE event, middleware)
    is built. An unexpected error (a bare ServiceError) says only that it happened, with the request id."""
    message = error.message
    if type(error) is ServiceError:
        message = f"Internal error (request id {request_id})"
    return {"error": {"message": message, "type": error.error_type, "code": error.code, "param": error.param,
                      "request_id": request_id}}


class HTTPStatusError(ServiceError):
    """A plain HTTP error raised by the framework (404 for an unknown path, 405 ...)."""

    error_type = "invalid_request_error"


class UnauthorizedError(ServiceError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, built or loaded. Raised at start-up, not per request."""
