"""The running service over real HTTP: Ray Serve, the router, both model deployments, tiny checkpoints."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import FULL_APP, SINGLE_APP, one_cancellation, process_info, running_generations
from tests.waiting import wait_until

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there"}]


def read_sse(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, data payload) of every SSE event in a streaming response."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append((time.monotonic(), line[len("data: "):]))
    return events


def stream_chat(client: httpx.Client, path: str = CHAT, **body) -> tuple[httpx.Response, list[tuple[float, str]]]:
    with client.stream("POST", path, json={"messages": HELLO, "stream": True, **body}) as response:
        return response, read_sse(response) if response.status_code == 200 else []


def deltas(events: list[tuple[float, str]]) -> list[dict]:
    chunks = [json.loads(data) for _, data in events if data != "[DONE]"]
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def test_health_answers_without_a_model(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_models_lists_both_loaded_variants(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["MiniCPM-V-4.6", "MiniCPM-V-4.6-Thinking"]


def test_tokens_arrive_as_several_chunks_then_done_once(client):
    response, events = stream_chat(client, model="instruct", max_tokens=24, min_tokens=24)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    text_events = [t for t, data in events if '"content"' in data or '"reasoning_content"' in data]
    assert len(text_events) >= 5
    assert [data for _, data in events].count("[DONE]") == 1
    assert events[-1][1] == "[DONE]"


def test_the_first_tokens_arrive_while_the_replica_is_still_generating(client):
    """A buffered response could only be read once generation ended: these tokens are read mid-generation."""
    body = {"model": "instruct", "messages": HELLO, "stream": True, "max_tokens": 3000, "min_tokens": 3000}
    with client.stream("POST", CHAT, json=body) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        first = [json.loads(next(events).removeprefix("data: ")) for _ in range(5)]
        assert running_generations(FULL_APP, "instruct") == 1, "the replica must still be generating"
    assert all(chunk["choices"][0].get("finish_reason") is None for chunk in first)
    assert any(chunk["choices"][0]["delta"].get("content") for chunk in first)
    wait_until(lambda: running_generations(FULL_APP, "instruct") == 0, what="the replica to stop generating")


def test_finish_reason_and_usage_on_request(client):
    _, events = stream_chat(client, model="instruct", max_tokens=8, min_tokens=8,
                            stream_options={"include_usage": True})
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all("usage" not in c for c in chunks[:-1])


def test_thinking_goes_to_the_thinking_deployment_with_reasoning(client):
    _, events = stream_chat(client, model="MiniCPM-V-4.6-Thinking", max_tokens=16, min_tokens=16)
    assert {json.loads(d)["model"] for _, d in events[:-1]} == {"MiniCPM-V-4.6-Thinking"}
    assert "".join(d.get("reasoning_content") or "" for d in deltas(events))


def test_thinking_off_goes_to_instruct_with_answer_only(client):
    body = {"model": "MiniCPM-V-4.6-Thinking", "chat_template_kwargs": {"enable_thinking": False},
            "messages": HELLO, "max_tokens": 16, "min_tokens": 16}
    answer = client.post(CHAT, json=body).json()
    assert answer["model"] == "MiniCPM-V-4.6"
    assert answer["choices"][0]["message"]["reasoning_content"] is None
    assert answer["choices"][0]["message"]["content"]


def test_enable_thinking_overrides_the_model_name(client):
    body = {"model": "instruct", "chat_template_kwargs": {"enable_thinking": True}, "messages": HELLO,
            "max_tokens": 4}
    assert client.post(CHAT, json=body).json()["model"] == "MiniCPM-V-4.6-Thinking"


def test_single_variant_serves_both_modes_and_only_flips_enable_thinking(client):
    def prompt_tokens(thinking: bool) -> tuple[str, int]:
        body = {"model": "thinking" if thinking else "instruct", "messages": HELLO, "max_tokens": 2}
        answer = client.post(f"/single{CHAT}", json=body).json()
        return answer["model"], answer["usage"]["prompt_tokens"]

    (model_on, tokens_on), (model_off, tokens_off) = prompt_tokens(True), prompt_tokens(False)
    assert model_on == model_off == "MiniCPM-V-4.6"
    # Thinking off pre-fills an empty <think></think> block: the prompt is longer.
    assert tokens_off > tokens_on


def test_unknown_model_is_404_model_not_found(client):
    response = client.post(CHAT, json={"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": HELLO, "n": 1000}, "n"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": HELLO, "frobnicate": 1}, "frobnicate"),
    ({"messages": HELLO, "max_tokens": 10**6}, "max_tokens"),
])
def test_malformed_or_unsupported_bodies_are_400_with_the_param(client, body, param):
    response = client.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("method, path", [("GET", "/v1/nope"), ("POST", "/v1/completions"), ("GET", "/single/nope")])
def test_an_unknown_path_is_a_404_in_the_error_shape(client, method, path):
    response = client.request(method, path, json={"messages": HELLO})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "http_404" and error["type"] == "invalid_request_error" and error["message"] == "Not Found"
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_and_max_tokens_over_the_context_are_400_context_length_exceeded(client, stream):
    """Refused before any token, so a stream gets the 400 too (not a 200 with an error inside)."""
    prompt = client.post(CHAT, json={"model": "instruct", "messages": HELLO, "max_tokens": 1}).json()["usage"]
    response = client.post(CHAT, json={"model": "instruct", "messages": HELLO, "max_tokens": 8000, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens", error
    assert error["type"] == "invalid_request_error"
    assert f"context is 4096 tokens; the request has {prompt['prompt_tokens']} prompt tokens and asks for up to " \
           "8000 more" in error["message"], error


@pytest.mark.parametrize("field, allowed, over, says", [
    ("stop", ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], "at most 4 stop sequences are allowed"),
    ("stop_token_ids", list(range(1, 65)), list(range(1, 66)), "at most 64 items"),
    ("top_logprobs", 20, 21, "less than or equal to 20"),
])
def test_the_caps_on_stops_stop_token_ids_and_top_logprobs_are_400s_naming_the_field(client, field, allowed, over,
                                                                                      says):
    body = {"model": "instruct", "messages": HELLO, "max_tokens": 2, "logprobs": True}
    response = client.post(CHAT, json={**body, field: allowed})
    assert response.status_code == 200, f"at the cap: {response.text}"
    response = client.post(CHAT, json={**body, field: over})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert says in error["message"] and error["message"].startswith(f"{field}: "), error


def test_invalid_json_is_400(client):
    response = client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_request_id_round_trips(client):
    response = client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}, headers={"X-Request-Id": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["id"] == "req-42"


def test_openai_sdk_streams_and_non_streams_unchanged(serve_url):
    sdk = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused")
    completion = sdk.chat.completions.create(model="MiniCPM-V-4.6", messages=HELLO, max_tokens=6)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    stream = sdk.chat.completions.create(
        model="MiniCPM-V-4.6-Thinking", messages=HELLO, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": 12},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12
    assert any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices)


def test_client_disconnect_stops_generation_on_the_replica_within_a_decode_step(client):
    with one_cancellation(FULL_APP, "instruct"):
        with client.stream("POST", CHAT, json={"model": "instruct", "messages": HELLO, "stream": True,
                                               "max_tokens": 3000, "min_tokens": 3000}) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert running_generations(FULL_APP, "instruct") == 1, "precondition: it is generating"


LONG = {"model": "instruct", "messages": HELLO, "stream": True, "max_tokens": 3000, "min_tokens": 3000}


def test_a_client_leaving_an_n_request_cancels_every_one_of_its_sequences(client):
    """n=3 rows of 3000 tokens each: only the cancellation can end them within the wait."""
    with one_cancellation(FULL_APP, "instruct", rows=3):
        with client.stream("POST", CHAT, json={**LONG, "n": 3, "temperature": 1.0}) as response:
            started: set[int] = set()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line.removeprefix("data: "))["choices"][0]
                    if choice["delta"].get("content"):
                        started.add(choice["index"])
                if len(started) == 3:
                    break
            assert running_generations(FULL_APP, "instruct") == 3, "precondition: the three rows are generating"


class _Reader(threading.Thread):
    """A stream read in a thread: counts its content chunks until told to stop, then leaves (closing it)."""

    def __init__(self, serve_url: str, body: dict, path: str = CHAT) -> None:
        super().__init__(daemon=True)
        self.serve_url, self.body, self.path = serve_url, body, path
        self.chunks, self.leave, self.error = 0, threading.Event(), None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.serve_url, timeout=60) as http, \
                    http.stream("POST", self.path, json=self.body) as response:
                for line in response.iter_lines():
                    if '"content"' in line:
                        self.chunks += 1
                    if self.leave.is_set() or '"error"' in line:
                        self.error = line if '"error"' in line else None
                        return
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = repr(exc)


def release(readers: list[_Reader]) -> None:
    """Every reader leaves its stream (all told first, then each awaited)."""
    for reader in readers:
        reader.leave.set()
    for reader in readers:
        reader.join(timeout=60)


def test_cancelling_one_row_of_a_batch_leaves_the_other_rows_generating(serve_url):
    """Three 3000-token streams batched together; one leaves: exactly its row is cancelled, and the two others
    keep receiving tokens afterwards (then they leave too, so three rows are cancelled in all)."""
    before = process_info(FULL_APP, "instruct")["cancelled_rows"]
    readers = [_Reader(serve_url, {**LONG, "messages": [{"role": "user", "content": f"row {i}"}]}) for i in range(3)]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: all(r.chunks for r in readers) and running_generations(FULL_APP, "instruct") == 3,
                   what="three rows generating")
        leaving, staying = readers[0], readers[1:]
        leaving.leave.set()
        leaving.join(timeout=60)
        wait_until(lambda: running_generations(FULL_APP, "instruct") == 2, what="the left row to leave the batch")
        assert process_info(FULL_APP, "instruct")["cancelled_rows"] == before + 1, "only the left row was cancelled"
        counts = [r.chunks for r in staying]
        wait_until(lambda: all(r.chunks > c + 5 for r, c in zip(staying, counts)),
                   what="the other rows to keep generating after the cancellation")
        assert running_generations(FULL_APP, "instruct") == 2 and not any(r.error for r in readers)
    finally:
        release(readers)
    wait_until(lambda: running_generations(FULL_APP, "instruct") == 0, what="the replica to stop generating")
    assert process_info(FULL_APP, "instruct")["cancelled_rows"] == before + 3


def rejected_count(metrics_port: int, app: str) -> float:
    """The router's `rejected` requests of `app`, from Ray's Prometheus export."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_minicpm_requests_total{") and f'application="{app}"' in line
               and 'status="rejected"' in line)


@pytest.mark.parametrize("stream", [False, True])
def test_overload_gives_503_with_retry_after_not_a_broken_200_and_counts_it(serve_url, metrics_port, stream):
    # max_ongoing_requests 4 + max_queued_requests 2 on the single app's replica: 12 at once overflow.
    body = {"messages": HELLO, "max_tokens": 250, "min_tokens": 250, "stream": stream}
    wait_until(lambda: running_generations(SINGLE_APP, "instruct") == 0, what="the replica to be idle")
    rejected_before = rejected_count(metrics_port, SINGLE_APP)

    def call(_):
        with httpx.Client(base_url=serve_url, timeout=60) as http:
            response = http.post(f"/single{CHAT}", json=body)
            return response.status_code, response.headers.get("retry-after"), response.text

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, results
    assert 503 in statuses and 200 in statuses
    for status, retry_after, text in results:
        if status == 503:
            error = json.loads(text)["error"]
            assert int(retry_after) >= 1, f"Retry-After must be a number of seconds, not {retry_after!r}"
            assert error["type"] == "overloaded_error" and error["code"] == "overloaded" and "capacity" in error["message"]
    for status, _, text in results:
        if status == 200 and stream:  # a stream that got its 200 ran to the end, no error inside
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    assert running_generations(SINGLE_APP, "instruct") == 0
    wait_until(lambda: rejected_count(metrics_port, SINGLE_APP) - rejected_before == statuses.count(503),
               interval=0.5, what="the rejected requests to be counted")
