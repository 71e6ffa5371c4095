"""Throughput benchmark: in-process `model.generate` against the running service over HTTP.

    python -m benchmarks.throughput                      # CPU: the `small` preset
    python -m benchmarks.throughput --preset full-size   # GPU: real dimensions

In one run on one machine it measures the in-process baseline (plain `generate`, tokens/s and
time to first token; measured before and again after the service runs, as the speed of a shared
machine drifts, and averaged), then starts Ray Serve with one replica of the same checkpoint and
streams over HTTP at each concurrency, once per batching mode (continuous: new requests join the
running batch; static: they wait for it to end), and prints the ratios that matter. Raw numbers
go to JSON, a plot to PNG. Every request asks for exactly `--tokens` tokens (min_tokens), so
random weights cannot end early.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.service import start_app, stop_app
from benchmarks import announce_cpu

PROMPT = "Write a long story about a lighthouse keeper and the sea."
MIN_REQUESTS = 8  # per concurrency level, so that a median at concurrency 1 is not a median of two


class _FirstToken(BaseStreamer):
    def __init__(self) -> None:
        self.first: float | None = None
        self._calls = 0

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def in_process(checkpoint: str, tokens: int, runs: int, threads: int) -> dict:
    """Plain transformers: processor + generate, greedy, exactly `tokens` new tokens."""
    from deployments.engine import checkpoint as ckpt

    torch.set_num_threads(threads)
    processor, model = ckpt.load(checkpoint, "instruct")
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    ttfts, rates = [], []
    for run in range(runs + 1):
        started = time.perf_counter()
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", enable_thinking=False).to(model.device)
        streamer = _FirstToken()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer)
        elapsed = time.perf_counter() - started
        if run:  # the first run warms up
            ttfts.append(streamer.first - started)
            rates.append(tokens / elapsed)
    return {"ttft_p50_s": statistics.median(ttfts), "tokens_per_s": statistics.median(rates), "runs": runs}


async def engine_direct(checkpoint: str, tokens: int, concurrency: list[int], batch: int, batch_wait_ms: float,
                        threads: int) -> list[dict]:
    """The replica's engine without Ray or HTTP: isolates batching from the serving path."""
    from deployments.common.config import ModelConfig
    from deployments.engine.engine import Engine
    from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams

    engine = Engine(ModelConfig(variant="instruct", checkpoint=checkpoint, max_batch_size=batch,
                                batch_wait_ms=batch_wait_ms, torch_threads=threads, max_model_len=32768))
    request = GenerationRequest([ChatMessage("user", [PROMPT])], enable_thinking=False,
                                sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0))

    async def one() -> None:
        async for _ in engine.stream(request):
            pass

    await one()
    levels = []
    for count in concurrency:
        admissions, started = len(engine.core.batch_sizes), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        levels.append({"concurrency": count, "aggregate_tokens_per_s": count * tokens / (time.perf_counter() - started),
                       "rows_after_each_admission": engine.core.batch_sizes[admissions:]})
    return levels


async def _stream_once(client: httpx.AsyncClient, tokens: int) -> tuple[float, float, int]:
    body = {"model": "instruct", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, completion = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and ('"content":"' in line or '"reasoning_content"' in line) and '"content":""' not in line:
                first = time.perf_counter()
            if '"usage"' in line and '"choices":[]' in line:
                completion = json.loads(line[len("data: "):])["usage"]["completion_tokens"]
    return first - started, time.perf_counter() - started, completion


async def over_http(url: str, tokens: int, concurrency: int, rounds: int) -> dict:
    """`concurrency` clients streaming `rounds` requests each (MIN_REQUESTS in all at least), back to back, over
    one keep-alive client pool."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _stream_once(client, 4)  # warm up connections and the replica
        results = []

        async def one_client() -> None:
            for _ in range(max(rounds, -(-MIN_REQUESTS // concurrency))):
                results.append(await _stream_once(client, tokens))

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = sorted(ttft for ttft, _, _ in results)
    return {"concurrency": concurrency, "requests": len(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "tokens_per_s_per_stream": statistics.median(c / d for _, d, c in results),
            "aggregate_tokens_per_s": sum(c for _, _, c in results) / wall}


def _ratios(baseline: dict, levels: list[dict], direct: list[dict]) -> dict:
    by_c = {level["concurrency"]: level for level in levels}
    ratios = {}
    if 1 in by_c:
        ratios["http_single_stream_over_in_process"] = by_c[1]["tokens_per_s_per_stream"] / baseline["tokens_per_s"]
        ratios["ttft_overhead_p50_ms"] = (by_c[1]["ttft_p50_s"] - baseline["ttft_p50_s"]) * 1000
        if 8 in by_c:
            ratios["aggregate_8_over_1"] = by_c[8]["aggregate_tokens_per_s"] / by_c[1]["aggregate_tokens_per_s"]
            engine_by_c = {level["concurrency"]: level for level in direct}
            ratios["engine_aggregate_8_over_1"] = (engine_by_c[8]["aggregate_tokens_per_s"]
                                                   / engine_by_c[1]["aggregate_tokens_per_s"])
    return ratios


def start_service(checkpoint: str, batch: int, batch_wait_ms: float, threads: int, continuous: bool) -> str:
    gpu = 1 if torch.cuda.is_available() else 0
    return start_app({
        "instruct": {"model": {"checkpoint": checkpoint, "max_batch_size": batch, "batch_wait_ms": batch_wait_ms,
                               "torch_threads": threads, "max_model_len": 32768, "continuous_batching": continuous},
                     "deployment": {"num_replicas": 1, "max_queued_requests": 256,
                                    "ray_actor_options": {"num_cpus": 1, "num_gpus": gpu}}},
        "thinking": None,
        "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}},
    })


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (mode, levels) in zip(("C0", "C1", "C2"), results["service"].items()):
        xs = [r["concurrency"] for r in levels]
        left.plot(xs, [r["aggregate_tokens_per_s"] for r in levels], "o-", color=color,
                  label=f"service ({mode}), aggregate")
        left.plot(xs, [r["tokens_per_s_per_stream"] for r in levels], "s--", color=color,
                  label=f"service ({mode}), per stream")
        right.plot(xs, [r["ttft_p50_s"] * 1000 for r in levels], "o-", color=color, label=f"{mode} p50")
        right.plot(xs, [r["ttft_p95_s"] * 1000 for r in levels], "s:", color=color, label=f"{mode} p95")
    left.plot([r["concurrency"] for r in results["engine_direct"]],
              [r["aggregate_tokens_per_s"] for r in results["engine_direct"]], "^:", color="C4",
              label="engine, no Ray/HTTP")
    left.axhline(results["in_process"]["tokens_per_s"], color="gray", ls="--", label="in-process generate")
    left.set(xlabel="concurrent streams", ylabel="tokens/s", title="Throughput")
    left.legend()
    right.axhline(results["in_process"]["ttft_p50_s"] * 1000, color="gray", ls="--", label="in-process p50")
    right.set(xlabel="concurrent streams", ylabel="ms", title="Time to first token", yscale="log")
    right.legend()
    fig.suptitle(f"{results['checkpoint']} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="small (CPU default) or full-size (GPU default)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory or hub id instead of a preset")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests each client sends at each concurrency (at least 8 in all)")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the replica")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="batch_wait_ms of the replica")
    parser.add_argument("--batching", default="continuous,static",
                        help="batching modes to measure through the service, in order: continuous, static")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads (CPU), for the baseline and the replica alike. Default: all cores but one, "
                        "which the serving path (proxy, router, Ray) needs")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    cpu = announce_cpu()
    modes = args.batching.split(",")
    if set(modes) - {"continuous", "static"}:
        parser.error(f"--batching takes continuous and/or static, not {args.batching!r}")

    preset = args.preset or ("full-size" if torch.cuda.is_available() else "small")
    checkpoint = args.checkpoint or f"preset:{preset}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(f"Benchmark: {checkpoint} on {device}, {args.tokens} tokens per request")
    before = in_process(checkpoint, args.tokens, runs=3, threads=args.threads)
    print(f"in-process generate: {before['tokens_per_s']:.1f} tok/s, TTFT p50 {before['ttft_p50_s'] * 1000:.1f} ms")

    concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    direct = asyncio.run(engine_direct(checkpoint, args.tokens, concurrency_levels, args.batch, args.batch_wait_ms,
                                       args.threads))
    for level in direct:
        print(f"engine x{level['concurrency']:<3} (no Ray/HTTP) aggregate {level['aggregate_tokens_per_s']:7.1f} tok/s")

    service = {}
    for mode in modes:
        url = start_service(checkpoint, args.batch, args.batch_wait_ms, args.threads, continuous=mode == "continuous")
        time.sleep(5)  # let the work of deploying (controller, health checks) settle before measuring
        service[mode] = [asyncio.run(over_http(url, args.tokens, c, args.rounds)) for c in concurrency_levels]
        for level in service[mode]:
            print(f"HTTP {mode:<10} x{level['concurrency']:<3} TTFT p50 {level['ttft_p50_s'] * 1000:7.1f} ms  p95 "
                  f"{level['ttft_p95_s'] * 1000:7.1f} ms  per stream {level['tokens_per_s_per_stream']:6.1f} tok/s  "
                  f"aggregate {level['aggregate_tokens_per_s']:7.1f} tok/s")
    stop_app()

    after = in_process(checkpoint, args.tokens, runs=3, threads=args.threads)
    baseline = {key: (before[key] + after[key]) / 2 for key in ("tokens_per_s", "ttft_p50_s")}
    print(f"in-process generate again: {after['tokens_per_s']:.1f} tok/s, TTFT p50 {after['ttft_p50_s'] * 1000:.1f} ms "
          f"(baseline: the mean, {baseline['tokens_per_s']:.1f} tok/s, {baseline['ttft_p50_s'] * 1000:.1f} ms)")
    ratios = {mode: _ratios(baseline, levels, direct) for mode, levels in service.items()}
    for mode, values in ratios.items():
        print(f"ratios ({mode}):", ", ".join(f"{k} = {v:.2f}" for k, v in values.items()))
    print("targets: http_single_stream_over_in_process >= 0.90, ttft_overhead_p50_ms <= 50, aggregate_8_over_1 >= 3")

    results = {"cpu": cpu, "checkpoint": checkpoint, "device": device, "tokens": args.tokens, "batch": args.batch,
               "batch_wait_ms": args.batch_wait_ms, "threads": args.threads, "in_process": baseline,
               "in_process_before": before, "in_process_after": after, "engine_direct": direct, "service": service,
               "ratios": ratios, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-{preset if not args.checkpoint else 'checkpoint'}-wait{args.batch_wait_ms:g}ms"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
