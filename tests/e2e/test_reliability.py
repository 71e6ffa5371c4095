"""Faults, overload and bad input against the running service; each bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import FULL_APP, SINGLE_APP, process_info, running_generations
from tests.e2e.test_service import CHAT, HELLO
from tests.waiting import wait_until


def wait_idle(app: str, deployment: str, seconds: float = 60) -> None:
    """Return once nothing generates on the replica (fail after `seconds`)."""
    wait_until(lambda: running_generations(app, deployment) == 0, timeout=seconds, interval=0.1,
               what=f"{app}/{deployment} to stop generating")


def test_disconnect_storm_leaves_nothing_running_and_memory_flat(serve_url, client):
    # The storm hits both variants: each one's (single) replica must stay flat.
    variants = ("instruct", "thinking")
    baseline = {variant: process_info(FULL_APP, variant) for variant in variants}

    def open_and_drop(i: int) -> int:
        with httpx.Client(base_url=serve_url, timeout=30) as http:
            body = {"model": "instruct" if i % 2 else "thinking", "messages": HELLO, "stream": True,
                    "max_tokens": 2000, "min_tokens": 2000}
            with http.stream("POST", CHAT, json=body) as response:
                if response.status_code == 200:
                    lines = response.iter_lines()
                    for _ in range(3):
                        next(lines)
                return response.status_code

    # 6 at a time: within each variant's capacity (4 running + 2 queued per replica).
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(open_and_drop, range(30)))
    # A dropped stream holds its slot until the replica has cancelled it (a few ms), so a quick
    # successor may meet a full queue: backpressure (503) is fine, anything else is not.
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 20, statuses
    # Every dropped stream's row is gone from both replicas' batches.
    wait_idle(FULL_APP, "instruct")
    wait_idle(FULL_APP, "thinking")
    for variant in variants:
        info = process_info(FULL_APP, variant)
        assert info["pid"] == baseline[variant]["pid"], f"the {variant} replica is the one measured before"
        growth = info["rss_bytes"] - baseline[variant]["rss_bytes"]
        assert growth < 150 * 2**20, f"the {variant} replica's memory grew by {growth / 2**20:.0f} MiB"
    assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 3}).status_code == 200


def test_overload_burst_gets_success_or_retry_after_never_a_hang_or_500(serve_url):
    def call(_) -> tuple[int, str | None, float]:
        started = time.monotonic()
        with httpx.Client(base_url=serve_url, timeout=60) as http:
            response = http.post(f"/single{CHAT}", json={"messages": HELLO, "max_tokens": 60, "min_tokens": 60})
            return response.status_code, response.headers.get("retry-after"), time.monotonic() - started

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(call, range(40)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 20, "capacity is 4 running + 2 queued: most of a 40-request burst is refused"
    assert all(int(retry) >= 1 for status, retry, _ in results if status == 503), "Retry-After: whole seconds"
    assert max(duration for _, _, duration in results) < 60


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_fields = ["model", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
           "chat_template_kwargs", "stream_options", "min_tokens", "repetition_penalty", "tools"]
_bodies = st.one_of(
    _json_values,
    st.fixed_dictionaries({"messages": st.just(HELLO)}, optional={f: _json_values for f in _fields}),
    st.fixed_dictionaries({"messages": st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                                                _json_values, max_size=3), max_size=3)}),
)
FUZZ_CASES = 150


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_bodies)
def test_fuzzed_bodies_never_get_a_5xx(client, body):
    if isinstance(body, dict) and body.get("messages") == HELLO:
        body = {**body, "max_tokens": 2, "min_tokens": 0, "stream": False} | {"messages": HELLO}
    response = client.post(CHAT, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type", "code", "param"}


# Depends on test order: it means something only right after the fuzzing above (pytest runs a module's tests
# in file order); alone it still passes, as a plain health check.
def test_service_is_healthy_after_the_fuzzing(client):
    assert client.get("/health").status_code == 200
    assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


@pytest.mark.timeout(180)
def test_killed_replica_ends_streams_with_an_error_event_and_is_replaced(serve_url, client):
    """Beside the stream, a non-streaming request is generating when the replica dies: it gets a 500 whose
    message is the generic one with its request id, never the text of Ray's error."""
    victim = process_info(SINGLE_APP, "instruct")["pid"]
    long = {"messages": HELLO, "max_tokens": 3000, "min_tokens": 3000}
    with client.stream("POST", f"/single{CHAT}", json={**long, "stream": True}) as response, \
            httpx.Client(base_url=serve_url, timeout=120) as other, ThreadPoolExecutor(1) as pool:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        plain = pool.submit(other.post, f"/single{CHAT}", json=long, headers={"X-Request-Id": "dies-with-replica"})
        wait_until(lambda: running_generations(SINGLE_APP, "instruct") == 2, what="both requests generating")
        os.kill(victim, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]  # must end, not hang
        failed = plain.result(timeout=120)
    assert rest[-1] == "data: [DONE]" and rest.count("data: [DONE]") == 1
    assert '"error"' in rest[-2]
    assert failed.status_code == 500, failed.text
    assert failed.json() == {"error": {"message": "Internal error (request id dies-with-replica)",
                                       "type": "internal_error", "code": "internal_error", "param": None,
                                       "request_id": "dies-with-replica"}}
    wait_until(lambda: client.post(f"/single{CHAT}", json={"messages": HELLO, "max_tokens": 2}).status_code == 200,
               timeout=120, interval=1, what="a replacement replica to answer")
    assert process_info(SINGLE_APP, "instruct")["pid"] != victim


@pytest.mark.timeout(240)
def test_redeploy_lets_an_in_flight_stream_finish(serve_url):
    from ray import serve

    from deployments.common.config import AppArgs
    from serve_app import build_app
    from tests.e2e.conftest import app_args

    result: dict = {}
    generating = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=serve_url, timeout=120) as http:
            body = {"messages": HELLO, "stream": True, "max_tokens": 3000, "min_tokens": 3000,
                    "stream_options": {"include_usage": True}}
            with http.stream("POST", f"/single{CHAT}", json=body) as response:
                result["lines"] = []
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        result["lines"].append(line)
                        generating.set()  # tokens are arriving: the (old, only) replica is generating it
            result["ended"] = time.monotonic()

    old_pid = process_info(SINGLE_APP, "instruct")["pid"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        assert generating.wait(timeout=60), "the stream never started"
        # Only this stream generates (the replica's one-token health probe or an earlier test's stream may
        # still be ending: wait for them, not for a guess).
        wait_until(lambda: running_generations(SINGLE_APP, "instruct") == 1, what="only this stream generating")
        # A changed model setting replaces the replicas; the old one drains within the grace period.
        changed = app_args(thinking=None)  # the router keeps its settings; see conftest for the grace period
        changed["instruct"] = {**changed["instruct"], "model": {**changed["instruct"]["model"], "batch_wait_ms": 7}}
        redeploy_started = time.monotonic()
        # serve.run returns once the old replicas are gone, i.e. after they drained.
        serve.run(build_app(AppArgs.model_validate(changed)), name=SINGLE_APP, route_prefix="/single")
        new_pid = process_info(SINGLE_APP, "instruct")["pid"]
        running.result(timeout=180)
    assert new_pid != old_pid, "the redeploy replaced the replica"
    assert result["ended"] > redeploy_started, "the stream was in flight when the redeploy began"
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 3000
