"""Start the application on a local Ray instance for benchmarks and soak runs."""

from __future__ import annotations

import asyncio
import os
import socket
import time

_url: str | None = None
_loop: asyncio.AbstractEventLoop | None = None


def start_app(args: dict, name: str = "bench") -> str:
    """Deploy `build_app(args)` at / (starting Ray and Serve in this process on first use); return its base URL.

    Calling it again with other args replaces the application in place.
    """
    global _url
    import ray
    from ray import serve

    from deployments.common.config import AppArgs
    from serve_app import build_app

    if _url is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _url = f"http://127.0.0.1:{port}"
    serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix="/")
    return _url


def stop_app() -> None:
    """Shut Serve and Ray down (the next `start_app` starts them again)."""
    global _url
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    _url = None


def process_info(name: str = "instruct", app: str = "bench") -> dict:
    """The bench app's `name` replica's process_info(), asked from inside an event loop (a handle made outside
    one fails when Serve runs its router in the caller's loop, as RAY_SERVE_THROUGHPUT_OPTIMIZED does)."""
    from ray import serve

    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()  # one loop for every call: a handle stays bound to the loop it was made in

    async def ask() -> dict:
        return await serve.get_deployment_handle(name, app_name=app).process_info.remote()

    return _loop.run_until_complete(ask())


def wait_compiled(part: str, timeout_s: float = 1800) -> None:
    """Wait until the bench app's instruct replica runs `part` ("decode" or "resumed_prefill", as its
    `process_info` names them) compiled: the graphs are built in the background after it starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = process_info()[part]
        if info["compiled"]:
            print(f"{part} compiled in {info['compile_s']:.0f} s", flush=True)
            return
        if info["compile_error"] or time.monotonic() > deadline:
            raise RuntimeError(f"{part} did not compile: {info}")
        time.sleep(2)
