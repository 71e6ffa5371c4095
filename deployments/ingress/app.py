"""The router's FastAPI app, built from its config by one function: routes, middleware and the one mapping of
every error to a status and the OpenAI error body. Route functions only call the router object."""

from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.common.config import RouterArgs
from deployments.common.errors import BadRequestError, HTTPStatusError, OverloadedError, ServiceError, error_body
from deployments.ingress.access import AccessMiddleware, AccessPolicy
from deployments.ingress.middleware import CHAT_PATH, AdmissionMiddleware, RequestIdMiddleware
from deployments.ingress.schemas import ChatCompletionRequest, ModelList
from deployments.ingress.streaming import finish, logger, status_of, unwrap

CHAT_PAGE = (Path(__file__).parent / "static" / "chat.html").read_text()


class Service(Protocol):
    """What the routes call (the Router deployment)."""

    def models(self) -> ModelList: ...

    async def chat_completions(self, body: ChatCompletionRequest, request: Request): ...


def build_ingress_app(service: Service, args: RouterArgs) -> FastAPI:
    """The app for one router replica. Raises ValueError when `args.api_key_env` names an unset variable."""
    app = FastAPI(title="MiniCPM-V 4.6 on Ray Serve", version="1.0")
    policy = AccessPolicy()
    policy.configure(args.api_key, args.api_key_env, args.cors_origins, args.max_body_bytes, args.max_ongoing_chats)
    app.add_middleware(AccessMiddleware, policy=policy)
    app.add_middleware(AdmissionMiddleware, policy=policy)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so even a 401 or a 503 carries an id
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> str:
        """The web chat page: self-contained, talks to /v1/chat/completions like any client."""
        return CHAT_PAGE

    @app.get("/health")
    async def health() -> dict:
        """Liveness of the router; touches no model."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return service.models()

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.chat_completions(body, request)

    return app


def _error_response(request: Request, error: ServiceError, headers: dict | None = None) -> JSONResponse:
    body = error_body(error, getattr(request.state, "request_id", None))
    return JSONResponse(body, status_code=error.status_code, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, to its status and the OpenAI error shape (500s: a generic message)."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        trace = getattr(request.state, "trace", None)
        if trace is not None and request.url.path.endswith(CHAT_PATH):
            trace.status = status_of(exc)
            finish(trace)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
        return _error_response(request, exc, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        if first["type"] == "json_invalid":
            return await service_error(request, BadRequestError("The request body is not valid JSON"))
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return await service_error(request, BadRequestError(f"{param or 'body'}: {first['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = HTTPStatusError(str(exc.detail))
        error.status_code, error.code = exc.status_code, f"http_{exc.status_code}"
        return _error_response(request, error, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error in request %s", getattr(request.state, "request_id", None))
        return await service_error(request, unwrap(exc))
