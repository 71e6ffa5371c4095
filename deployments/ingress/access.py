"""Who may call the API and how much they may send: an optional bearer API key, optional CORS
origins, a request body size limit, and how many chat requests a router replica takes at once.

Without a key, anyone who can reach the port can use the model replicas (and their GPUs).
"""

from __future__ import annotations

import hmac
import json
import os

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.common.config import DEFAULT_MAX_ONGOING_CHATS
from deployments.common.errors import OverloadedError, PayloadTooLargeError, ServiceError, UnauthorizedError, error_body

# With a key set, the API and its schema need it; the chat page (which asks for the key itself) and
# the health check do not.
PROTECTED_PREFIXES = ("/v1/", "/docs", "/redoc", "/openapi.json")


class AccessPolicy:
    """The router's access settings; set once when the router replica starts."""

    def __init__(self) -> None:
        self.api_key: str | None = None
        self.cors_origins: list[str] = []
        self.max_body_bytes: int | None = None
        self.max_ongoing_chats = DEFAULT_MAX_ONGOING_CHATS

    def configure(self, api_key: str | None, api_key_env: str | None, cors_origins: list[str],
                  max_body_bytes: int | None = None, max_ongoing_chats: int = DEFAULT_MAX_ONGOING_CHATS) -> None:
        """Raises ValueError when `api_key_env` names a variable that is not set."""
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"router.api_key_env names {api_key_env!r}, which is not set in the environment")
        self.api_key = api_key or None
        self.cors_origins = list(cors_origins)
        self.max_body_bytes = max_body_bytes
        self.max_ongoing_chats = max_ongoing_chats

    def allows(self, authorization: str) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = authorization.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


class AccessMiddleware:
    """Refuses `/v1/*` without the right `Authorization: Bearer` key (401, OpenAI error shape);
    answers CORS for the configured origins only."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy
        self._cors: CORSMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        app = self._with_cors()
        path = route_path(scope)
        headers = dict(scope["headers"])
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if path.startswith(PROTECTED_PREFIXES) and not preflight:
            if not self.policy.allows(headers.get(b"authorization", b"").decode("latin-1")):
                error = UnauthorizedError("Missing or invalid API key: send it as 'Authorization: Bearer <key>'")
                return await send_error(scope, send, error, self.policy.cors_origins)
        limit = self.policy.max_body_bytes
        if limit is not None:
            receive = await _within_limit(headers, receive, limit)
            if receive is None:
                error = PayloadTooLargeError(f"The request body is larger than the {limit} byte limit")
                return await send_error(scope, send, error, self.policy.cors_origins)
        await app(scope, receive, send)

    def _with_cors(self) -> ASGIApp:
        if not self.policy.cors_origins:
            return self.app
        if self._cors is None:
            self._cors = CORSMiddleware(
                self.app, allow_origins=self.policy.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id"], expose_headers=["X-Request-Id"],
            )
        return self._cors


async def _within_limit(headers: dict, receive: Receive, limit: int) -> Receive | None:
    """`receive` for a body within `limit` bytes, or None when it is over.

    A declared Content-Length is checked at once. A body sent without one (chunked) is read here, up
    to one byte past the limit, and replayed to the app: the app reads whole bodies anyway, and an
    error raised from inside the app's body parsing would surface as its 400 instead of a 413.
    """
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            return receive if int(declared) <= limit else None
        except ValueError:
            return receive  # the server rejects a malformed Content-Length itself
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return receive  # the client left: let the app see it
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            return None
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed() -> dict:
        return replay.pop() if replay else await receive()

    return replayed


def route_path(scope: Scope) -> str:
    """The request's path inside the application (without the route prefix it is mounted at)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def send_error(scope: Scope, send: Send, error: ServiceError, cors_origins: list[str]) -> None:
    """Answer with `error` in the API's error shape, from pure ASGI (before the app has read the body)."""
    status = error.status_code
    body = json.dumps(error_body(error, scope.get("state", {}).get("request_id"))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(error, OverloadedError):
        headers.append((b"retry-after", str(error.retry_after).encode()))

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # Through CORS (when on) so that a browser page on an allowed origin can read the error too.
    app = CORSMiddleware(respond, allow_origins=cors_origins) if cors_origins else respond
    await app(scope, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}
