"""API key and CORS checks, in-process over ASGI (no Ray)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployments.ingress.access import AccessMiddleware, AccessPolicy
from deployments.common.errors import PayloadTooLargeError


def make_client(api_key=None, api_key_env=None, cors_origins=(), max_body_bytes=None) -> httpx.AsyncClient:
    policy = AccessPolicy()
    policy.configure(api_key, api_key_env, list(cors_origins), max_body_bytes)

    async def ok(request):
        return JSONResponse({"ok": True, "size": len(await request.body())})

    async def too_large(request, exc):
        return JSONResponse({"error": {"code": exc.code}}, status_code=exc.status_code)

    app = Starlette(exception_handlers={PayloadTooLargeError: too_large}, routes=[Route("/v1/models", ok), Route("/health", ok), Route("/", ok),
                            Route("/v1/chat/completions", ok, methods=["POST"])])
    wrapped = AccessMiddleware(app, policy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://test")


async def test_without_a_key_everything_is_open():
    async with make_client() as client:
        assert (await client.get("/v1/models")).status_code == 200


async def test_key_required_on_v1_with_openai_error_shape():
    async with make_client(api_key="s3cret") as client:
        missing = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        basic = await client.get("/v1/models", headers={"Authorization": "Basic s3cret"})
        right = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200


async def test_health_and_the_page_stay_open_with_a_key():
    async with make_client(api_key="s3cret") as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/")).status_code == 200


async def test_key_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("TEST_MINICPM_KEY", "from-env")
    async with make_client(api_key="ignored", api_key_env="TEST_MINICPM_KEY") as client:
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer from-env"})).status_code == 200
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer ignored"})).status_code == 401


def test_a_named_but_unset_environment_variable_fails_at_start(monkeypatch):
    monkeypatch.delenv("TEST_MINICPM_MISSING", raising=False)
    with pytest.raises(ValueError, match="TEST_MINICPM_MISSING"):
        AccessPolicy().configure(None, "TEST_MINICPM_MISSING", [])


async def test_cors_is_off_unless_origins_are_configured():
    async with make_client() as client:
        response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_allows_only_configured_origins_and_preflight_needs_no_key():
    async with make_client(api_key="k", cors_origins=["https://app.example"]) as client:
        preflight = await client.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        allowed = await client.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        denied = await client.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        unauthorized = await client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in denied.headers
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == "https://app.example"


async def test_bodies_over_the_limit_are_413_with_or_without_content_length():
    async with make_client(max_body_bytes=100) as client:
        small = await client.post("/v1/chat/completions", content=b"x" * 100)
        declared = await client.post("/v1/chat/completions", content=b"x" * 101)

        async def chunks():
            for _ in range(3):
                yield b"y" * 60

        streamed = await client.post("/v1/chat/completions", content=chunks())
    assert small.status_code == 200 and small.json()["size"] == 100
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"
    assert streamed.status_code == 413
