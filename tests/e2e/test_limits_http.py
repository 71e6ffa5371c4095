"""Every configurable limit, through the running service, on an app with small caps.

A temporary app at /limits: the router takes 2 chat requests at once, bodies up to 256 KiB, and
small media caps; remote fetching is on for `localhost` only (a local test server), so the private
address guard is off there and the domain list is what refuses other hosts. Its model replica's
health check runs every second, for the stalled-replica test at the end.
Each refusal is checked for status, error code and the limit named in the message.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.e2e.conftest import process_info, temporary_app
from tests.e2e.test_media_http import image, text, video
from tests.e2e.test_service import CHAT, HELLO, rejected_count
from tests.unit.test_media import data_url, image_bytes, solid_png, video_bytes
from tests.waiting import wait_until

APP = "limits"
PREFIX = "/limits"
BODY_LIMIT = 256 * 1024
IMAGE_BYTES = 40_000
VIDEO_BYTES = 60_000
MEDIA = {
    "max_images_per_request": 2, "max_videos_per_request": 1,
    "max_image_bytes": IMAGE_BYTES, "max_video_bytes": VIDEO_BYTES, "max_image_pixels": 100_000,
    "max_video_duration_s": 6, "video_fps": 2, "video_fps_cap": 2, "max_video_frames": 6,
    "allow_remote": True, "allow_private_addresses": True, "allowed_domains": ["localhost"],
    "max_redirects": 1, "read_timeout_s": 1, "fetch_timeout_s": 30,
}
PNG = image_bytes("PNG", (64, 48))
BIG_PNG = os.urandom(IMAGE_BYTES + 1)  # the size check comes before any decoding
SLOW_PAUSE_S = 15  # the test server's pause before the body of /slow; the app's read timeout is 1 s


def chat(client: httpx.Client, content: list[dict], **body) -> httpx.Response:
    return client.post(f"{PREFIX}{CHAT}", json={"max_tokens": 2, "messages": [{"role": "user", "content": content}],
                                                **body})


def refused(response: httpx.Response, status: int, code: str, *says: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for words in says:
        assert words in error["message"], error
    return error


def prompt_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def limits(serve_url) -> Iterator[None]:
    # The session's other apps hold 3.5 of the cluster's 4 CPUs: this one asks for little.
    router = {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 2},
              "max_body_bytes": BODY_LIMIT, "media": MEDIA}
    # compile_decode at its default (on): the one app of the suite that serves while its decode step compiles.
    model = {"checkpoint": "preset:tiny", "torch_threads": 1}
    instruct = {"model": model, "deployment": {
        "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 4,
        "max_queued_requests": 2, "health_check_period_s": 1, "health_check_timeout_s": 5}}
    with temporary_app(APP, PREFIX, {"instruct": instruct, "thinking": None, "router": router}):
        yield


@pytest.fixture(scope="module")
def media_host() -> Iterator[str]:
    """Base URL (`http://localhost:<port>`) of a local server for the remote fetch limits."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (the stdlib's name)
            port = self.server.server_address[1]
            if self.path == "/img":
                return self._send(PNG)
            if self.path == "/big":
                return self._send(BIG_PNG)
            if self.path == "/big-chunked":  # no Content-Length: only counting the bytes can refuse it
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(BIG_PNG), 8192):
                    block = BIG_PNG[start:start + 8192]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.wfile.write(b"0\r\n\r\n")
                return None
            redirects = {"/redirect-once": "/img", "/redirect-twice": "/redirect-once",
                         "/redirect-to-ip": f"http://127.0.0.1:{port}/img"}
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if self.path == "/slow":  # headers at once, then nothing for longer than the read timeout
                self.send_response(200)
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                time.sleep(SLOW_PAUSE_S)
                self.wfile.write(PNG)
                return None
            self.send_error(404)
            return None

        def _send(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


# ---- counts and sizes of media ----


def test_images_over_max_images_per_request_are_400_naming_the_limit(client, limits):
    url = data_url(PNG, "image/png")
    assert chat(client, [image(url), image(url), text()]).status_code == 200
    refused(chat(client, [image(url)] * 3 + [text()]), 400, "invalid_request", "3 images", "limit is 2")


def test_videos_over_max_videos_per_request_are_400_naming_the_limit(client, limits):
    url = data_url(video_bytes("mp4", frames=10), "video/mp4")
    assert chat(client, [video(url), text()]).status_code == 200
    refused(chat(client, [video(url), video(url), text()]), 400, "invalid_request", "2 videos", "limit is 1")


def test_an_image_over_max_image_bytes_is_413_naming_the_limit(client, limits):
    ok = image_bytes("PNG", (64, 48))
    assert len(ok) < IMAGE_BYTES and chat(client, [image(data_url(ok, "image/png")), text()]).status_code == 200
    refused(chat(client, [image(data_url(BIG_PNG, "image/png")), text()]), 413, "payload_too_large",
            f"{IMAGE_BYTES} byte limit")


def test_a_video_over_max_video_bytes_is_413_naming_the_limit(client, limits):
    big = video_bytes("mp4") + os.urandom(VIDEO_BYTES)  # the size check comes before any decoding
    refused(chat(client, [video(data_url(big, "video/mp4")), text()]), 413, "payload_too_large",
            f"{VIDEO_BYTES} byte limit")


def test_an_image_over_max_image_pixels_is_400_naming_both_counts(client, limits):
    assert chat(client, [image(data_url(solid_png(316, 316), "image/png")), text()]).status_code == 200
    refused(chat(client, [image(data_url(solid_png(400, 300), "image/png")), text()]), 400, "invalid_media",
            "120000 pixels", "limit is 100000")


def test_a_video_over_max_video_duration_is_400_naming_the_limit(client, limits):
    seven_seconds = video_bytes("mp4", frames=70)
    refused(chat(client, [video(data_url(seven_seconds, "video/mp4")), text()]), 400, "invalid_media",
            "7.0 s long", "limit is 6 s")


def test_fps_above_the_cap_samples_as_the_cap_does(client, limits):
    url = data_url(video_bytes("mp4", frames=20), "video/mp4")  # 2 s: 4 frames at the 2 fps cap
    at_cap = prompt_tokens(chat(client, [video(url, fps=2), text()]))
    assert prompt_tokens(chat(client, [video(url, fps=1), text()])) < at_cap, "precondition: fps changes the prompt"
    assert prompt_tokens(chat(client, [video(url, fps=30), text()])) == at_cap
    assert prompt_tokens(chat(client, [video(url), text()])) == at_cap, "video_fps is the default"


def test_max_frames_above_the_cap_samples_as_the_cap_does(client, limits):
    url = data_url(video_bytes("mp4", frames=50), "video/mp4")  # 5 s: 10 frames at 2 fps, capped to 6
    at_cap = prompt_tokens(chat(client, [video(url, max_frames=6), text()]))
    assert prompt_tokens(chat(client, [video(url, max_frames=2), text()])) < at_cap, "precondition"
    assert prompt_tokens(chat(client, [video(url, max_frames=100), text()])) == at_cap
    assert prompt_tokens(chat(client, [video(url), text()])) == at_cap


# ---- the request body ----


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_max_body_bytes_is_413_naming_the_limit_with_or_without_content_length(client, limits, chunked):
    body = json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}).encode()
    content = iter([body[:1000], body[1000:]]) if chunked else body  # an iterator goes out chunked
    response = client.post(f"{PREFIX}{CHAT}", content=content, headers={"Content-Type": "application/json"})
    assert ("content-length" in response.request.headers) is not chunked
    refused(response, 413, "payload_too_large", f"{BODY_LIMIT} byte limit")
    small = json.dumps({"max_tokens": 2, "messages": HELLO}).encode()
    assert client.post(f"{PREFIX}{CHAT}", content=iter([small]),
                       headers={"Content-Type": "application/json"}).status_code == 200


# ---- remote fetching ----


def test_a_remote_image_is_fetched_and_a_redirect_within_max_redirects_followed(client, limits, media_host):
    text_only = prompt_tokens(chat(client, [text()]))
    assert prompt_tokens(chat(client, [image(f"{media_host}/img"), text()])) > text_only
    assert prompt_tokens(chat(client, [image(f"{media_host}/redirect-once"), text()])) > text_only


def test_more_redirects_than_max_redirects_is_400_naming_the_limit(client, limits, media_host):
    refused(chat(client, [image(f"{media_host}/redirect-twice"), text()]), 400, "invalid_media",
            "redirected more than 1 times")


def test_a_host_or_a_redirect_outside_allowed_domains_is_refused(client, limits, media_host):
    port = media_host.rsplit(":", 1)[1]
    refused(chat(client, [image(f"http://127.0.0.1:{port}/img"), text()]), 400, "media_refused", "allowed_domains")
    refused(chat(client, [image(f"{media_host}/redirect-to-ip"), text()]), 400, "media_refused", "allowed_domains")


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_a_remote_image_over_max_image_bytes_is_413_with_or_without_content_length(client, limits, media_host, path):
    refused(chat(client, [image(f"{media_host}{path}"), text()]), 413, "payload_too_large",
            f"{IMAGE_BYTES} byte limit")


def test_a_server_slower_than_read_timeout_is_400_within_seconds(client, limits, media_host):
    started = time.monotonic()
    refused(chat(client, [image(f"{media_host}/slow"), text()]), 400, "invalid_media", "timed out", "between reads 1 s")
    assert time.monotonic() - started < SLOW_PAUSE_S, "the 1 s read timeout, not the server's pause, ended it"


def test_a_remote_error_status_is_400_naming_it(client, limits, media_host):
    refused(chat(client, [image(f"{media_host}/missing"), text()]), 400, "invalid_media", "404")


# ---- overload at the router tier ----


@pytest.mark.parametrize("stream", [False, True])
def test_past_the_routers_own_cap_a_request_gets_503_with_retry_after_at_once_and_is_counted(
        serve_url, limits, metrics_port, stream):
    long = {"messages": HELLO, "stream": True, "max_tokens": 3000, "min_tokens": 3000}
    before = rejected_count(metrics_port, APP)
    with httpx.Client(base_url=serve_url, timeout=60) as first, httpx.Client(base_url=serve_url, timeout=60) as second:
        with first.stream("POST", f"{PREFIX}{CHAT}", json=long) as a, \
                second.stream("POST", f"{PREFIX}{CHAT}", json=long) as b:
            assert a.status_code == b.status_code == 200
            # Both are generating: the router holds 2 chats. (Keep the line iterators: one dropped closes its stream.)
            lines = a.iter_lines(), b.iter_lines()
            assert all(next(line).startswith("data: ") for line in lines)
            with httpx.Client(base_url=serve_url, timeout=60) as third:
                started = time.monotonic()
                response = third.post(f"{PREFIX}{CHAT}", json={"messages": HELLO, "max_tokens": 2, "stream": stream})
                waited = time.monotonic() - started
                # The cheap routes still answer: Serve's own cap on the router leaves room above the router's.
                assert third.get(f"{PREFIX}/health").status_code == 200
                assert third.get(f"{PREFIX}/v1/models").status_code == 200
    error = refused(response, 503, "overloaded", "router is at capacity (2 requests at once)")
    assert error["type"] == "overloaded_error"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"] == error["request_id"]
    # Queued, it would have waited for a 3000-token stream to end.
    assert waited < 15, f"refused at once, not after queueing ({waited:.1f} s)"
    wait_until(lambda: rejected_count(metrics_port, APP) - before == 1, interval=0.5,
               what="the router's rejection to be counted")
    with httpx.Client(base_url=serve_url, timeout=60) as after:  # the streams are gone: capacity is back
        wait_until(lambda: after.post(f"{PREFIX}{CHAT}", json={"messages": HELLO, "max_tokens": 2}).status_code == 200,
                   what="the router to take requests again")


def test_concurrent_refusals_do_not_leak_router_slots(serve_url, limits):
    """Bursts of refused and oversized requests leave the router's count of ongoing chats at zero."""
    def bad(_):
        with httpx.Client(base_url=serve_url, timeout=60) as http:
            return http.post(f"{PREFIX}{CHAT}", json={"messages": [{"role": "user", "content": [image("ftp://x/y")]}]})

    with ThreadPoolExecutor(8) as pool:
        statuses = [r.status_code for r in pool.map(bad, range(24))]
    assert set(statuses) <= {400, 503}, statuses
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        answers = [http.post(f"{PREFIX}{CHAT}", json={"messages": HELLO, "max_tokens": 2}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]


# ---- a replica that stops responding (last: it replaces the replica) ----


@pytest.mark.timeout(240)
def test_a_stalled_replica_fails_its_health_check_and_is_replaced(serve_url, limits):
    """SIGSTOP freezes the model replica's process; the health check (every 1 s, 5 s timeout) fails,
    Serve replaces the replica, the stream it held ends with an error event, and the app answers again."""
    victim = process_info(APP, "instruct")["pid"]
    long = {"messages": HELLO, "stream": True, "max_tokens": 3000, "min_tokens": 3000}
    with httpx.Client(base_url=serve_url, timeout=120) as http:
        try:
            with http.stream("POST", f"{PREFIX}{CHAT}", json=long) as response:
                lines = response.iter_lines()
                next(lines)
                os.kill(victim, signal.SIGSTOP)
                stalled_at = time.monotonic()
                rest = [line for line in lines if line.startswith("data: ")]  # must end, not hang
            ended_after = time.monotonic() - stalled_at
        finally:
            _resume(victim)  # if Serve has not killed it: let it die normally
        assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2], rest[-3:]
        wait_until(lambda: http.post(f"{PREFIX}{CHAT}", json={"messages": HELLO, "max_tokens": 2}).status_code == 200,
                   timeout=150, interval=1, what="a replacement replica to answer")
    assert process_info(APP, "instruct")["pid"] != victim
    assert ended_after < 100, f"the stream on the stalled replica ended only after {ended_after:.0f} s"


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
