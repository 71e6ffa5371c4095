"""Run by test_two_nodes.py in its own process (a process can join only one Ray cluster).

A head node runs the router; a second node, the only one with the `model_node` resource, runs
the model replica. That node is removed, a new one joins, and the service must answer again.
Prints one line per step; exits non-zero on failure.
"""

from __future__ import annotations

import socket
import sys

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster

from deployments.common.config import AppArgs
from serve_app import build_app
from tests.waiting import wait_until

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, seconds: float) -> bool:
    """Whether the service answers a chat request within `seconds` (asked once a second)."""
    def answered() -> bool:
        try:
            return httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=20).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answered, timeout=seconds, interval=1, what="the service to answer")
    except AssertionError as timed_out:
        print(timed_out, flush=True)
        return False
    return True


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    first = cluster.add_node(num_cpus=1, resources={"model_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs.model_validate({
        "instruct": {"model": {"checkpoint": "preset:tiny", "torch_threads": 1, "compile_decode": False},
                     "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5,
                                                                            "resources": {"model_node": 0.5}}}},
        "thinking": None,
        "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}},
    })
    serve.run(build_app(args), name="two-nodes", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print("answers before:", answers(url, 30), flush=True)
    cluster.remove_node(first, allow_graceful=False)
    print("node removed", flush=True)
    cluster.add_node(num_cpus=1, resources={"model_node": 1})
    print("new node added", flush=True)
    recovered = answers(url, 150)
    print("answers after:", recovered, flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return 0 if recovered else 1


if __name__ == "__main__":
    sys.exit(main())
