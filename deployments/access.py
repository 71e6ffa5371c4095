"""Who may call the API: an optional bearer API key and optional CORS origins.

Without a key, anyone who can reach the port can use the model replicas (and their GPUs).
"""

from __future__ import annotations

import hmac
import json
import os

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# Paths anyone may open: the chat page asks for the key itself, and health checks need none.
PROTECTED_PREFIX = "/v1/"


class AccessPolicy:
    """The router's access settings; set once when the router replica starts."""

    def __init__(self) -> None:
        self.api_key: str | None = None
        self.cors_origins: list[str] = []

    def configure(self, api_key: str | None, api_key_env: str | None, cors_origins: list[str]) -> None:
        """Raises ValueError when `api_key_env` names a variable that is not set."""
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"router.api_key_env names {api_key_env!r}, which is not set in the environment")
        self.api_key = api_key or None
        self.cors_origins = list(cors_origins)

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
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        headers = dict(scope["headers"])
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if path.startswith(PROTECTED_PREFIX) and not preflight:
            if not self.policy.allows(headers.get(b"authorization", b"").decode("latin-1")):
                return await _unauthorized(scope, receive, send, self.policy.cors_origins)
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


async def _unauthorized(scope: Scope, receive: Receive, send: Send, cors_origins: list[str]) -> None:
    request_id = scope.get("state", {}).get("request_id")
    body = json.dumps({"error": {
        "message": "Missing or invalid API key: send it as 'Authorization: Bearer <key>'",
        "type": "invalid_request_error", "code": "invalid_api_key", "param": None, "request_id": request_id,
    }}).encode()

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    # Through CORS (when on) so that a browser page on an allowed origin can read the 401 too.
    app = CORSMiddleware(respond, allow_origins=cors_origins) if cors_origins else respond
    await app(scope, receive, send)
