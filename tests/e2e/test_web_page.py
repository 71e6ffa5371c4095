"""The web chat page in headless Chromium against the running service (no mocks, no CDN)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import FULL_APP, one_cancellation, process_info, running_generations

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts"



@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        # Flags: no sandbox as root; no background connections (this machine has no network).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic",
        ])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, serve_url):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(serve_url + "/")
    page.wait_for_function("document.querySelector('#model-name').textContent.length > 0")
    yield page
    context.close()


def send(page, text: str, max_tokens: int = 40) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def wait_done(page, timeout_ms: int = 30_000) -> None:
    page.wait_for_selector("#send:not([hidden])", timeout=timeout_ms)


def chat_requests(page) -> list[dict]:
    """The bodies of the chat requests the page sends from now on, as the browser sent them."""
    bodies: list[dict] = []
    page.on("request", lambda request: bodies.append(json.loads(request.post_data))
            if request.method == "POST" and request.url.endswith("/v1/chat/completions") else None)
    return bodies


def greedy(page) -> None:
    """Temperature 0 (a range input: set and announced as a user's drag would)."""
    page.locator("#temperature").evaluate("(e) => { e.value = '0'; e.dispatchEvent(new Event('input')); }")


def test_page_is_self_contained(client):
    html = client.get("/").text
    assert "<script" in html and "http://" not in html and "https://" not in html


# At the moment the last answer holds more text than it did: whether its stream was still running; null
# before; {grew: false} when the stream ended first.
_GROWTH = """(first) => {
  const answers = document.querySelectorAll('.msg.assistant .answer');
  if (answers[answers.length - 1].textContent.length > first) return {grew: true, running: !$('stop').hidden};
  return $('send').hidden ? null : {grew: false};
}""".replace("$(", "document.getElementById(")


def test_send_streams_an_answer_that_grows(page):
    # The random weights sample an end-of-sequence token now and then (temperature 0.7): an answer that ended
    # within its first chunk cannot show growth, so the question is asked again, up to three times.
    for attempt in range(3):
        send(page, "Tell me a story", max_tokens=400)
        answer = page.locator(".msg.assistant .answer").last
        page.wait_for_function("(n) => document.querySelectorAll('.msg.assistant .answer').length == n &&"
                               " document.querySelectorAll('.msg.assistant .answer')[n - 1].textContent.length > 0",
                               arg=attempt + 1)
        first = len(answer.text_content())
        growth = page.wait_for_function(_GROWTH, arg=first).json_value()
        if growth["grew"]:
            break
        wait_done(page)
    assert growth == {"grew": True, "running": True}, "the answer grew while the stream was still running"
    wait_done(page)
    assert page.locator(".msg.user .bubble").last.text_content() == "Tell me a story"
    assert "MiniCPM-V-4.6" in page.locator(".msg.assistant .meta").last.text_content() or \
        "instruct" in page.locator(".msg.assistant .meta").last.text_content()


def test_thinking_switch_clears_history_with_a_notice_and_shows_reasoning(page):
    send(page, "first question", max_tokens=5)
    wait_done(page)
    assert page.locator(".msg").count() == 2
    page.click("#thinking-toggle")
    assert page.locator(".msg").count() == 0
    assert page.locator(".notice").text_content() == "Switched to 'thinking' model, history cleared."
    send(page, "think about it", max_tokens=20)
    wait_done(page)
    reasoning = page.locator(".msg.assistant .reasoning").last
    assert reasoning.is_visible() and reasoning.locator(".reasoning-text").text_content()
    page.click("#thinking-toggle")
    assert page.locator(".notice").text_content() == "Switched to 'instruct' model, history cleared."


def test_single_variant_switch_keeps_history(browser, serve_url):
    context = browser.new_context()
    page = context.new_page()
    page.goto(serve_url + "/single")
    page.wait_for_function("document.querySelector('#model-name').textContent === 'MiniCPM-V-4.6'")
    send(page, "hello", max_tokens=5)
    wait_done(page)
    page.click("#thinking-toggle")
    assert page.locator(".msg").count() == 2
    assert "history kept" in page.locator(".notice").last.text_content()
    context.close()


def test_attached_image_is_previewed_and_reaches_the_model(page, tmp_path):
    # A colour of this run's own: no cache of the router or the replica can have seen this image before.
    colour = tuple(uuid.uuid4().bytes[:3])
    image = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), colour).save(image)
    page.set_input_files("#attach", str(image))
    page.wait_for_selector("#attachments img.thumb")  # the page reads the file asynchronously
    assert page.locator("#attachments img.thumb").count() == 1
    bodies = chat_requests(page)
    encoded = process_info(FULL_APP, "instruct")["vision_cache"]["misses"]
    send(page, "what colour is this?", max_tokens=8)
    wait_done(page)
    assert page.locator("#attachments img").count() == 0
    assert page.locator(".msg.user img.thumb").count() == 1
    assert "finish" in page.locator(".msg.assistant .meta").last.text_content()
    assert page.locator(".error").count() == 0
    # The browser sent the file itself, and the model's vision tower encoded one new image for it.
    [body] = bodies
    parts = body["messages"][-1]["content"]
    assert isinstance(parts, list), f"the page sent text only: {parts!r}"
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "what colour is this?"
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    assert process_info(FULL_APP, "instruct")["vision_cache"]["misses"] == encoded + 1


def test_stop_ends_generation_on_the_server_within_a_decode_step(page):
    with one_cancellation(FULL_APP, "instruct"):
        send(page, "go on forever", max_tokens=3000)
        page.wait_for_function("document.querySelector('.msg.assistant .answer').textContent.length > 20")
        assert running_generations(FULL_APP, "instruct") == 1, "precondition: it is generating"
        page.click("#stop")
        wait_done(page, timeout_ms=30000)
    assert "finish: stopped" in page.locator(".msg.assistant .meta").last.text_content()


def test_regenerate_replaces_the_last_answer_and_clear_empties(page):
    greedy(page)  # greedy: an answer of the same non-empty text each time
    bodies = chat_requests(page)
    send(page, "hi", max_tokens=6)
    wait_done(page)
    first = page.locator(".msg.assistant .answer").last.text_content()
    assert first, "precondition: the greedy answer to 'hi' has text"
    page.locator(".msg.assistant").last.evaluate("(node) => { node.dataset.old = 'yes'; }")
    page.click("#regenerate")
    wait_done(page)
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    assert page.locator(".msg.assistant[data-old]").count() == 0, "the old answer's message was replaced"
    assert page.locator(".msg.assistant .answer").last.text_content() == first, "greedy: the same answer again"
    assert "finish" in page.locator(".msg.assistant .meta").last.text_content()
    # Regenerating asked again with the same history, the old answer left out of it ...
    assert len(bodies) == 2 and bodies[1]["messages"] == bodies[0]["messages"] == [{"role": "user", "content": "hi"}]
    # ... and the next turn carries the new answer once.
    send(page, "and then?", max_tokens=2)
    wait_done(page)
    history = bodies[2]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"] and history[1]["content"]
    assert history[0]["content"] == "hi" and history[2]["content"] == "and then?"
    page.click("#clear")
    assert page.locator(".msg").count() == 0


def test_server_error_is_shown_in_the_page(page):
    send(page, "too long", max_tokens=8000)  # over the tiny model's 4096-token context
    wait_done(page)
    assert "context" in page.locator(".error").last.text_content()


def test_screenshot_of_a_conversation(page, tmp_path):
    image = tmp_path / "scene.png"
    picture = Image.new("RGB", (160, 120), "skyblue")
    picture.paste(Image.new("RGB", (160, 40), "forestgreen"), (0, 80))
    picture.save(image)
    page.click("#thinking-toggle")
    page.set_input_files("#attach", str(image))
    send(page, "Describe this picture, please.", max_tokens=60)
    wait_done(page)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
    assert Image.open(io.BytesIO(shot)).size[0] == 1280
