"""The router's ASGI middleware, outermost first: the request id, admission (how many chats at once), and
access (`deployments.ingress.access`: API key, CORS, body size). Pure ASGI rather than `@app.middleware`,
which would buffer streams and hide disconnects."""

import time
import uuid

from deployments.common.errors import OverloadedError
from deployments.common.metrics import RequestTrace
from deployments.ingress.access import AccessPolicy, route_path, send_error
from deployments.ingress.streaming import finish

CHAT_PATH = "/v1/chat/completions"


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
            finish(trace)
            error = OverloadedError(f"The router is at capacity ({self.policy.max_ongoing_chats} requests at once); "
                                    "retry shortly")
            return await send_error(scope, send, error, self.policy.cors_origins)
        self.ongoing += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.ongoing -= 1
