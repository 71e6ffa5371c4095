"""A real Ray Serve instance running the application on the built-in tiny checkpoints."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.kinds import EXACT_DTYPE
from tests.waiting import wait_until

FULL_APP = "minicpm"
SINGLE_APP = "single"
SECURE_APP = "secure"
SECURE_KEY = "test-key-123"
FUZZ_APP = "fuzz"


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: all bound at once, so the OS cannot hand out one twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_HTTP_PORT, _METRICS_PORT, _DASHBOARD_PORT = _free_ports(3)


def app_args(dtype: str = EXACT_DTYPE, **overrides) -> dict:
    """AppArgs for tests: one replica per deployment, a small queue so overload is reachable."""
    variant = {
        # float32: the HTTP tests compare answers with plain generate and seeds across requests
        # (tests/kinds.py); the secure and fuzz apps run at `dtype: auto`, so the default path is served too.
        "model": {"checkpoint": "preset:tiny", "torch_threads": 1, "dtype": dtype, "compile_decode": False},
        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5},
                       "max_ongoing_requests": 4, "max_queued_requests": 2,
                       # Long enough for the redeploy test's 3000-token stream on a busy CPU.
                       "graceful_shutdown_timeout_s": 120},
    }
    args = {"instruct": variant, "thinking": variant,
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25},
                                      "graceful_shutdown_timeout_s": 120}}}
    args.update(overrides)
    return args


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The directory whose files the main app accepts by path (media.local_media_dir)."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray exports Prometheus metrics for the test cluster."""
    return _METRICS_PORT


@pytest.fixture(scope="session")
def serve_url(tiny_checkpoints, media_dir: Path, metrics_port: int) -> Iterator[str]:
    """Base URL of a Serve instance with two apps.

    At /: both variants; local paths under `media_dir` allowed; remote fetching on (so the
    private-address guard is what refuses loopback URLs). At /single: instruct only, default
    media settings (remote fetching and local paths off). At /secure: instruct only, API key on,
    bodies capped at 1 MiB. At /fuzz: instruct only, at most 4 tokens per request (for the schema fuzzer).
    """
    import ray
    from ray import serve

    from deployments.common.config import AppArgs
    from serve_app import build_app

    port = _HTTP_PORT
    # The dashboard writes Prometheus' service-discovery file (test_prometheus.py scrapes through it).
    # A cluster of the tests' own, whatever runs here: the README's multi-machine section starts one, and
    # RAY_ADDRESS (or a running cluster) would otherwise make ray.init join it and refuse num_cpus.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=_DASHBOARD_PORT, log_to_driver=False,
             _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})  # metrics visible within ~1 s
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    router = {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
              "media": {"local_media_dir": str(media_dir), "allow_remote": True}}
    serve.run(build_app(AppArgs.model_validate(app_args(router=router))), name=FULL_APP, route_prefix="/")
    serve.run(build_app(AppArgs.model_validate(app_args(thinking=None))), name=SINGLE_APP, route_prefix="/single")
    secure_router = {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                     "api_key": SECURE_KEY, "max_body_bytes": 1024 * 1024}
    serve.run(build_app(AppArgs.model_validate(app_args("auto", thinking=None, router=secure_router))), name=SECURE_APP,
              route_prefix="/secure")
    fuzz_router = {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                   "max_tokens_cap": 4, "default_max_tokens": 4}
    serve.run(build_app(AppArgs.model_validate(app_args("auto", thinking=None, router=fuzz_router))), name=FUZZ_APP,
              route_prefix="/fuzz")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@contextmanager
def temporary_app(name: str, route_prefix: str, args: dict, **run_options) -> Iterator[None]:
    """Run an extra app beside the session's apps for the block, then delete it. The session's apps hold
    3.5 of the cluster's 4 CPUs: give its deployments small `num_cpus`."""
    from ray import serve

    from deployments.common.config import AppArgs
    from serve_app import build_app

    serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix=route_prefix, **run_options)
    try:
        yield
    finally:
        serve.delete(name)


def chat_turns(client: httpx.Client, path: str, image: str, count: int, model: str = "instruct",
               question: str = "question") -> list[dict]:
    """A chat of `count` user turns that keeps `image` (a data URL) in its first; each answer (4 greedy tokens)
    goes back into the history. Returns the responses' bodies."""
    messages, answers = [], []
    for k in range(count):
        content = [{"type": "text", "text": f"{question} {k}"}]
        if k == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image}})
        messages.append({"role": "user", "content": content})
        response = client.post(f"{path}/v1/chat/completions", json={"model": model, "messages": messages,
                                                                     "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        answers.append(response.json())
        messages.append({"role": "assistant", "content": answers[-1]["choices"][0]["message"]["content"]})
    return answers


@pytest.fixture(scope="session")
def client(serve_url: str) -> Iterator[httpx.Client]:
    """One keep-alive client for the session (a client per call would dominate latency)."""
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        yield http


def running_generations(app: str, deployment: str) -> int:
    """Generation threads alive in the (single) replica of a model deployment.

    Asked from a worker thread: callers such as Playwright's sync API run an event loop, where
    Serve refuses blocking `.result()` calls.
    """
    from ray import serve

    def ask() -> int:
        return serve.get_deployment_handle(deployment, app_name=app).running_generations.remote().result()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ask).result()


def process_info(app: str, deployment: str) -> dict:
    """The replica's `process_info()`: pid, memory, batch sizes, cancellation lags (see ModelDeployment)."""
    from ray import serve

    def ask() -> dict:
        return serve.get_deployment_handle(deployment, app_name=app).process_info.remote().result()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ask).result()


@contextmanager
def one_cancellation(app: str, deployment: str, rows: int = 1) -> Iterator[None]:
    """Asserts that the block cancels exactly `rows` generating rows on the replica (one, or the n of one request),
    and that each left the batch within one decode step of the cancellation reaching the replica (waits for the
    replica to go idle). Give the rows more tokens than the block can take (max_tokens = min_tokens = 3000):
    only a cancellation then ends them, and a row that ran to its end is not counted."""
    before = process_info(app, deployment)["cancelled_rows"]
    yield
    wait_until(lambda: running_generations(app, deployment) == 0, what=f"{app}/{deployment} to stop generating")
    info = process_info(app, deployment)
    assert info["cancelled_rows"] == before + rows, f"exactly {rows} generating row(s) cancelled"
    lags = info["cancel_lags"][-rows:]
    assert max(lags) <= 1, f"the rows took {lags} decode steps to leave"
