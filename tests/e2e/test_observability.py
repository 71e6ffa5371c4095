"""Service metrics on Ray's Prometheus export, request ids and per-request log lines."""

from __future__ import annotations

import base64
import json
import io
import re
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import FULL_APP, chat_turns
from tests.e2e.test_service import CHAT, HELLO
from tests.waiting import wait_until

_SAMPLE = re.compile(r'^(\w+)\{(.*)\} ([0-9.eE+-]+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Prometheus samples of this app's minicpm metrics, summed over replicas."""
    samples: dict[tuple[str, frozenset], float] = defaultdict(float)
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        match = _SAMPLE.match(line)
        if not match or not match.group(1).startswith("ray_minicpm_"):
            continue
        labels = dict(_LABEL.findall(match.group(2)))
        if labels.get("application") != FULL_APP:
            continue
        keep = frozenset((k, v) for k, v in labels.items() if k in ("variant", "status", "kind", "le", "cache", "result"))
        samples[(match.group(1), keep)] += float(match.group(3))
    return samples


def settled(port: int, quiet_s: float = 2.5) -> dict:
    """A scrape once earlier tests' metrics stopped arriving: two scrapes `quiet_s` apart agree (Ray exports
    every second, so a metric still changing shows in that time)."""
    previous: list[dict] = []  # the last scrape; none before the first call, which only takes one

    def unchanged() -> tuple[dict] | None:
        current = scrape(port)
        same = bool(previous) and current == previous[0]
        previous[:] = [current]
        return (current,) if same else None  # a tuple: an empty scrape (nothing counted yet) is settled too

    return wait_until(unchanged, timeout=60, interval=quiet_s, what="earlier tests' metrics to stop changing")[0]


def value(samples, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v for (n, keys), v in samples.items() if n == name and wanted <= set(keys))


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "orange").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def traffic(client, metrics_port):
    """Known traffic and the metric deltas it caused: (before, after, usages)."""
    before = settled(metrics_port)
    usage = {}
    with client.stream("POST", CHAT, json={"model": "instruct", "messages": HELLO, "stream": True, "max_tokens": 9,
                                           "min_tokens": 9, "stream_options": {"include_usage": True}}) as response:
        usage["stream"] = [line for line in response.iter_lines() if '"usage"' in line]
    answer = client.post(CHAT, json={"model": "thinking", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "what?"}]}],
        "max_tokens": 7, "min_tokens": 7}).json()
    usage["image"] = answer["usage"]
    with client.stream("POST", CHAT, json={"model": "thinking", "messages": HELLO, "stream": True,
                                           "max_tokens": 3000, "min_tokens": 3000}) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert client.post(CHAT, json={"messages": HELLO, "temperature": 9}).status_code == 400

    def all_counted() -> dict | None:
        after = scrape(metrics_port)
        counted = value(after, "ray_minicpm_requests_total") - value(before, "ray_minicpm_requests_total")
        ok = value(after, "ray_minicpm_requests_total", status="ok") - \
            value(before, "ray_minicpm_requests_total", status="ok")
        return after if counted >= 4 and ok >= 2 else None

    return before, wait_until(all_counted, timeout=60, interval=0.5, what="the four requests' metrics"), usage


def delta(traffic, name: str, **labels) -> float:
    before, after, _ = traffic
    return value(after, name, **labels) - value(before, name, **labels)


def test_requests_counted_by_variant_and_status(traffic):
    assert delta(traffic, "ray_minicpm_requests_total", variant="instruct", status="ok") == 1
    assert delta(traffic, "ray_minicpm_requests_total", variant="thinking", status="ok") == 1
    assert delta(traffic, "ray_minicpm_requests_total", variant="thinking", status="cancelled") == 1
    assert delta(traffic, "ray_minicpm_requests_total", status="client_error") == 1


def test_token_counters_match_reported_usage(traffic):
    _, _, usage = traffic
    assert delta(traffic, "ray_minicpm_generated_tokens_total", variant="instruct") == 9
    assert delta(traffic, "ray_minicpm_generated_tokens_total", variant="thinking") == 7
    assert delta(traffic, "ray_minicpm_prompt_tokens_total", variant="thinking") == usage["image"]["prompt_tokens"]


def test_latency_histograms_observe_each_request(traffic):
    assert delta(traffic, "ray_minicpm_time_to_first_token_seconds_count") == 3  # two finished + one cancelled
    assert delta(traffic, "ray_minicpm_inter_token_latency_seconds_count") >= 8
    assert delta(traffic, "ray_minicpm_request_latency_seconds_count") == 4
    assert delta(traffic, "ray_minicpm_request_latency_seconds_count", status="cancelled") == 1
    # Every observation falls in some bucket below +Inf of the documented edges.
    assert delta(traffic, "ray_minicpm_time_to_first_token_seconds_bucket", le="600.0") == 3


def test_media_decode_time_is_recorded_by_kind(traffic):
    assert delta(traffic, "ray_minicpm_media_decode_seconds_count", kind="image") == 1
    assert delta(traffic, "ray_minicpm_media_decode_seconds_count", kind="video") == 0


@pytest.mark.parametrize("gauge", ["ray_minicpm_active_streams", "ray_minicpm_batch_rows"])
def test_replica_gauges_count_a_running_stream_then_return_to_zero(traffic, client, metrics_port, gauge):
    with client.stream("POST", CHAT, json={"model": "instruct", "messages": HELLO, "stream": True,
                                           "max_tokens": 3000, "min_tokens": 3000}) as response:
        lines = response.iter_lines()
        next(lines)
        wait_until(lambda: value(scrape(metrics_port), gauge, variant="instruct") >= 1, timeout=60, interval=0.3,
                   what=f"{gauge} to count the running stream")
    wait_until(lambda: value(scrape(metrics_port), gauge, variant="instruct") == 0, timeout=60, interval=0.3,
               what=f"{gauge} to return to 0")
    names = {(n, dict(k).get("variant")) for n, k in scrape(metrics_port)}
    assert {(gauge, "instruct"), (gauge, "thinking")} <= names


def serve_logs(pattern: str) -> str:
    import ray

    log_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "\n".join(path.read_text(errors="replace") for path in log_dir.glob(pattern))


def test_request_id_round_trips_and_reaches_router_and_replica_logs(client):
    request_id = f"obs-{uuid.uuid4().hex[:12]}"
    response = client.post(CHAT, json={"model": "instruct", "messages": HELLO, "max_tokens": 3},
                           headers={"X-Request-Id": request_id})
    assert response.headers["x-request-id"] == request_id and response.json()["id"] == request_id

    def both_logged() -> tuple[str, str] | None:
        router, replica = serve_logs(f"replica_{FULL_APP}_router_*.log"), serve_logs(f"replica_{FULL_APP}_instruct_*.log")
        return (router, replica) if f"Request {request_id} finished" in router and request_id in replica else None

    router, replica = wait_until(both_logged, timeout=60, interval=0.3, what="the router's and replica's log lines")
    line = next(line for line in router.splitlines() if f"Request {request_id} finished" in line)
    assert "variant=instruct" in line and "status=ok" in line and "completion_tokens=3" in line and "ttft_s=" in line
    assert f"Request {request_id} generated" in replica
    assert "Hello there" not in router + replica, "prompt text must not be logged"


def test_error_bodies_carry_the_request_id(client):
    response = client.post(CHAT, json={"model": "nope", "messages": HELLO}, headers={"X-Request-Id": "err-77"})
    assert response.json()["error"]["request_id"] == "err-77"


def test_every_series_the_dashboard_queries_exists_in_a_live_scrape(traffic, client, metrics_port):
    dashboard = (Path(__file__).resolve().parents[2] / "observability" / "grafana-dashboard.json").read_text()
    queried = set(re.findall(r"ray_minicpm_\w+", dashboard))
    # A second turn of an image chat: the caches' hit series exist only once something hit.
    chat_turns(client, "", png_data_url(), 2, question="dashboard?")

    def missing() -> list[str]:
        return sorted(queried - {name for name, _ in scrape(metrics_port)})

    wait_until(lambda: not missing(), timeout=60, interval=0.5, what="every queried series in the scrape")
    assert queried


@pytest.mark.parametrize("sent", ["has spaces in it", "x" * 300, 'semi;colon"quote'])
def test_any_request_id_is_used_as_sent_in_header_and_body_alike(client, sent):
    response = client.post(CHAT, json={"model": "instruct", "messages": HELLO, "max_tokens": 2},
                           headers={"X-Request-Id": sent})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == response.json()["id"] == sent


def test_with_json_encoding_every_log_line_parses_and_the_request_id_is_on_its_lines(serve_url):
    from tests.e2e.conftest import app_args, temporary_app

    args = app_args(thinking=None, router={"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    args["instruct"]["deployment"] = {**args["instruct"]["deployment"], "ray_actor_options": {"num_cpus": 0.2}}
    with temporary_app("jsonlog", "/jsonlog", args, logging_config={"encoding": "JSON"}):
        request_id = f"json-{uuid.uuid4().hex[:12]}"
        with httpx.Client(base_url=serve_url, timeout=60) as http:
            response = http.post(f"/jsonlog{CHAT}", json={"messages": HELLO, "max_tokens": 3},
                                 headers={"X-Request-Id": request_id})
        assert response.status_code == 200

        def logged() -> list[dict] | None:
            lines = serve_logs("replica_jsonlog_*.log").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]  # every line must parse
            mine = [r for r in records if r.get("request_id") == request_id]
            # Serve names a deployment "<application>_<deployment>" in its records.
            return records if {r.get("deployment") for r in mine} >= {"jsonlog_router", "jsonlog_instruct"} else None

        records = wait_until(logged, timeout=60, interval=0.5, what="JSON log lines with the request id")
        mine = [r for r in records if r.get("request_id") == request_id]
        assert any(f"Request {request_id} finished" in r["message"] for r in mine)
        assert any(f"Request {request_id} generated" in r["message"] for r in mine)
