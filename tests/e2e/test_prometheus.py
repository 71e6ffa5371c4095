"""A real Prometheus (Debian's package, which `make test` installs) scrapes the test cluster through Ray's
service-discovery file, as the README tells operators to, and evaluates every query of the shipped
Grafana dashboard: each must run without an error, on series that exist."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import chat_turns
from tests.e2e.test_observability import png_data_url
from tests.e2e.test_service import CHAT, HELLO
from tests.waiting import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "observability" / "grafana-dashboard.json"


@pytest.fixture(scope="module")
def prometheus(serve_url, tmp_path_factory) -> Iterator[str]:
    import ray

    binary = shutil.which("prometheus")
    assert binary, "`make test` installs Debian's prometheus"
    discovery = Path(ray._private.worker._global_node.get_temp_dir_path()) / "prom_metrics_service_discovery.json"
    wait_until(discovery.exists, timeout=60, interval=0.5, what="Ray's Prometheus service-discovery file")
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(discovery)],
                                                                     "refresh_interval": "1s"}]}],
    }))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with (root / "prometheus.log").open("w") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        wait_until(lambda: _ready(url), timeout=60, interval=0.5, what="Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list:
    """The result of an instant query; fails on any PromQL or evaluation error."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def overload(serve_url: str) -> list[int]:
    """A burst past the single app's capacity (4 running + 2 queued): some requests are rejected."""
    def call(_) -> int:
        with httpx.Client(base_url=serve_url, timeout=120) as http:
            return http.post(f"/single{CHAT}", json={"messages": HELLO, "max_tokens": 200, "min_tokens": 200}).status_code

    with ThreadPoolExecutor(10) as pool:
        return list(pool.map(call, range(10)))


def traffic(client: httpx.Client) -> None:
    """Requests that give the dashboard's series fresh values: a thinking request and a two-turn image chat, a
    new one each time (its prompt is new to the caches, so their bytes change and are set again)."""
    assert client.post(CHAT, json={"model": "thinking", "messages": HELLO, "max_tokens": 3}).status_code == 200
    chat_turns(client, "", png_data_url(), 2, question=f"prometheus {uuid.uuid4().hex}?")


@pytest.fixture(scope="module")
def scraped(prometheus, client, serve_url) -> str:
    """Traffic that gives every dashboard query something to show (a plain request, a two-turn image chat, an
    overload burst for the rejected requests), then waits until Prometheus holds every series, found through
    Ray's discovery file."""
    traffic(client)
    statuses = overload(serve_url)
    assert 503 in statuses and 200 in statuses, statuses
    wanted = set(re.findall(r"ray_minicpm_\w+", DASHBOARD.read_text()))

    def missing() -> set[str]:
        present = query(prometheus, 'count by (__name__) ({__name__=~"ray_minicpm_.+"})')
        return wanted - {series["metric"]["__name__"] for series in present}

    wait_until(lambda: not missing(), timeout=120, interval=1, what="every dashboard series in Prometheus")
    return prometheus


def test_prometheus_finds_the_service_through_rays_discovery_file(scraped):
    series = query(scraped, 'ray_minicpm_requests_total{application="minicpm", status="ok"}')
    assert {s["metric"]["variant"] for s in series} >= {"instruct", "thinking"}
    assert all(s["metric"]["job"] == "ray" for s in series), "scraped through the discovery file's job"


@pytest.mark.parametrize("expr", dashboard_queries())
def test_every_dashboard_query_evaluates_in_prometheus_to_series(scraped, client, serve_url, expr):
    """Each query runs without an error and returns series: a query of a wrong name or label value would run
    too, and show an empty panel. (A rate needs two samples after the traffic: waited for.) While a query finds
    nothing, fresh traffic is sent now and then: in one run the active-streams and cache-bytes gauges had left
    Ray's export after the service idled for a minute or two (a gauge no one set for a while goes stale)."""
    # Grafana's "All" for $application is the regex .*; $__rate_interval is at least 4 scrape intervals.
    concrete = expr.replace("$application", ".*").replace("$__rate_interval", "1m")
    empty = [0]  # queries that found nothing so far

    def series() -> list:
        found = query(scraped, concrete)
        if not found:
            empty[0] += 1
            if empty[0] % 10 == 0:  # about every 10 s without series
                traffic(client)
                if "rejected" in concrete:
                    overload(serve_url)
        return found

    found = wait_until(series, timeout=90, interval=1, what=f"series of {concrete}")
    assert all(len(s["value"]) == 2 for s in found)
