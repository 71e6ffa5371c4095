"""Start the application on a local Ray instance for benchmarks and soak runs."""

from __future__ import annotations

import os
import socket


def start_app(args: dict, name: str = "bench") -> str:
    """Start Ray and Serve in this process, deploy `build_app(args)` at /, return its base URL."""
    import ray
    from ray import serve

    from deployments.config import AppArgs
    from serve_app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix="/")
    return f"http://127.0.0.1:{port}"
