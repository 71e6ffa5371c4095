"""The router's app, built from its config by a function (in-process over ASGI, a fake service behind it): two
apps with different settings coexist in one process, since nothing is configured through module globals."""

from __future__ import annotations

import httpx

from deployments.common.config import RouterArgs
from deployments.ingress.app import build_ingress_app
from deployments.ingress.schemas import ModelCard, ModelList


class FakeService:
    def __init__(self, name: str) -> None:
        self.name = name

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name)])

    async def chat_completions(self, body, request):
        raise AssertionError("not called here")


async def get(app, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        return await client.get(path, headers=headers)


async def test_two_apps_built_from_different_configs_keep_their_own_access_settings():
    locked = build_ingress_app(FakeService("locked"), RouterArgs(api_key="k1"))
    open_ = build_ingress_app(FakeService("open"), RouterArgs())
    assert (await get(locked, "/v1/models")).status_code == 401
    assert (await get(locked, "/v1/models", key="k1")).json()["data"][0]["id"] == "locked"
    response = await get(open_, "/v1/models")
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "open"
    assert response.headers["x-request-id"], "the request-id middleware wraps every app"


async def test_an_unknown_path_is_a_404_in_the_error_shape():
    response = await get(build_ingress_app(FakeService("m"), RouterArgs()), "/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "http_404"
