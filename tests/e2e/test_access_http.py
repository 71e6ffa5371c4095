"""The API key through the real service and in the web page."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import SECURE_KEY
from tests.e2e.test_service import CHAT, HELLO
from tests.e2e.test_web_page import browser, send, wait_done  # noqa: F401 (fixture)

KEY = {"Authorization": f"Bearer {SECURE_KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": SECURE_KEY}])
def test_missing_or_wrong_key_is_401_in_the_openai_shape(client, headers):
    response = client.post(f"/secure{CHAT}", json={"messages": HELLO, "max_tokens": 2}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_right_key_answers_and_health_stays_open(client):
    assert client.get("/secure/health").status_code == 200
    assert client.get("/secure/v1/models").status_code == 401
    assert client.get("/secure/v1/models", headers=KEY).status_code == 200
    answer = client.post(f"/secure{CHAT}", json={"messages": HELLO, "max_tokens": 3}, headers=KEY)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 3


def test_with_a_key_the_schema_and_docs_need_it_too(client):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(f"/secure{path}").status_code == 401, path
    assert client.get("/secure/openapi.json", headers=KEY).json()["paths"]


def test_apps_without_a_key_stay_open(client):
    assert client.get("/v1/models").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_openai_sdk_sends_the_key(serve_url):
    good = openai.OpenAI(base_url=f"{serve_url}/secure/v1", api_key=SECURE_KEY)
    assert good.chat.completions.create(model="instruct", messages=HELLO, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serve_url}/secure/v1", api_key="nope").models.list()


def test_web_page_asks_for_the_key_and_then_chats(browser, serve_url):  # noqa: F811
    context = browser.new_context()
    page = context.new_page()
    page.goto(serve_url + "/secure")
    page.wait_for_selector(".error")
    assert "API key" in page.locator(".error").last.text_content()
    page.fill("#api-key", SECURE_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model-name').textContent === 'MiniCPM-V-4.6'")
    send(page, "hello with a key", max_tokens=5)
    wait_done(page)
    assert "finish" in page.locator(".msg.assistant .meta").last.text_content()
    context.close()
