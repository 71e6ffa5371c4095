"""Soak run: mixed load against the service for a while; reports errors and memory growth.

    python -m benchmarks.soak --seconds 600

Runs both variants on the `tiny` preset (or --checkpoint) and keeps --concurrency clients busy
with a mix of streaming and non-streaming text, image and thinking requests, some dropped
mid-stream. At the end it prints the status counts, the number of unexpected errors (anything
but 200, or 503 under overload), and each replica's resident memory at the start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import time
from collections import Counter

import httpx
from PIL import Image

from benchmarks.service import start_app
from benchmarks import announce_cpu

APP = "soak"


def _image_url(rng: random.Random) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (rng.randint(32, 400), rng.randint(32, 400)), tuple(rng.randint(0, 255) for _ in range(3))).save(
        buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(rng: random.Random) -> dict:
    content: str | list = "Tell me something."
    if rng.random() < 0.3:
        content = [{"type": "image_url", "image_url": {"url": _image_url(rng)}}, {"type": "text", "text": "What?"}]
    return {"model": rng.choice(["instruct", "thinking"]), "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.randint(8, 96), "stream": rng.random() < 0.7, "temperature": rng.choice([0, 0.7])}


async def _client(url: str, until: float, seed: int, statuses: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < until:
            body, drop = _body(rng), rng.random() < 0.15
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if drop and line.startswith("data: "):
                            break  # client gone mid-stream
                        if '"error"' in line and response.status_code == 200:
                            statuses["error-in-stream"] += 1
                    statuses[str(response.status_code) + ("-dropped" if drop else "")] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1


def _memory() -> dict[str, int]:
    from ray import serve

    return {name: serve.get_deployment_handle(name, app_name=APP).process_info.remote().result()["rss_bytes"]
            for name in ("instruct", "thinking")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--checkpoint", default="preset:tiny")
    args = parser.parse_args()
    announce_cpu()

    variant = {"model": {"checkpoint": args.checkpoint, "max_batch_size": 4},
               "deployment": {"num_replicas": 1, "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 0.5}}}
    url = start_app({"instruct": variant, "thinking": variant,
                     "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}}, APP)
    before = _memory()
    statuses: Counter = Counter()
    started = time.monotonic()

    async def run() -> None:
        until = started + args.seconds
        await asyncio.gather(*(_client(url, until, seed, statuses) for seed in range(args.concurrency)))

    asyncio.run(run())
    after = _memory()
    unexpected = sum(n for status, n in statuses.items() if not status.startswith(("200", "503")))
    print(f"soak: {time.monotonic() - started:.0f} s, {sum(statuses.values())} requests, {args.concurrency} clients")
    print("statuses:", dict(sorted(statuses.items())))
    print(f"unexpected errors: {unexpected}")
    for name in before:
        print(f"{name} replica RSS: {before[name] / 2**20:.0f} MiB -> {after[name] / 2**20:.0f} MiB "
              f"({(after[name] - before[name]) / 2**20:+.0f} MiB)")


if __name__ == "__main__":
    main()
