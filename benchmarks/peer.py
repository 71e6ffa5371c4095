"""The peer benchmark: vLLM's CPU build and this service on the same checkpoint, same client, one run.

    make bench-peer                       # builds the peer's venv once, then runs this
    python -m benchmarks.peer --peer-python .peer-venv/bin/python

vLLM is a yardstick here, never a dependency of the service: it lives in a venv of its own (see
the Makefile's `bench-peer`). Both servers get the same `small` preset checkpoint (built with
`python -m deployments.engine.presets build`), and the same streaming client (greedy, exactly
`--tokens` tokens, one keep-alive httpx pool) measures each at every concurrency, one server
after the other. It prints both and the ratios the engine targets are stated in, and writes
`bench-results/peer-<preset>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.service import start_app, stop_app, wait_compiled
from benchmarks.throughput import over_http
from benchmarks import announce_cpu

PEER_PORT = 8100


def build_checkpoint(preset: str, out: Path) -> Path:
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "deployments.engine.presets", "build", preset, "--variant", "instruct",
                        "--out", str(out)], check=True)
    return out


def start_peer(python: str, checkpoint: Path, threads: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server on the checkpoint (bf16: its CPU linear-attention kernels refuse float32)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto",
           "OMP_NUM_THREADS": str(threads)}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--dtype", "bfloat16",
               "--max-model-len", "4096", "--port", str(PEER_PORT), "--served-model-name", "instruct"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the peer server exited with code {process.returncode}; see its log")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the peer server was not ready after {timeout_s:.0f} s")


def measure(url: str, tokens: int, levels: list[int], rounds: int) -> list[dict]:
    return [asyncio.run(over_http(url, tokens, level, rounds)) for level in levels]


def serving_path_cpu(url: str, tokens: int, streams: int) -> dict:
    """CPU milliseconds per streamed token spent in the Serve proxy and the router, over `streams`
    single streams of `tokens` tokens (read from the processes' own CPU counters)."""
    import psutil

    def cpu_seconds() -> dict[str, float]:
        totals = {"proxy": 0.0, "router": 0.0}
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            part = "proxy" if "ProxyActor" in command else "router" if ":router" in command else None
            if part:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    totals[part] += times.user + times.system
        return totals

    before = cpu_seconds()
    asyncio.run(over_http(url, tokens, 1, streams))
    after = cpu_seconds()
    streamed = tokens * max(streams, 8)  # over_http sends at least 8 requests
    return {f"{part}_cpu_ms_per_token": (after[part] - before[part]) * 1000 / streamed for part in before}


def ratios(ours: list[dict], peer: list[dict]) -> dict:
    ours_by, peer_by = ({r["concurrency"]: r for r in rs} for rs in (ours, peer))
    out = {}
    if 1 in ours_by:
        out["single_stream_tokens_per_s"] = ours_by[1]["tokens_per_s_per_stream"] / peer_by[1]["tokens_per_s_per_stream"]
        out["ttft_p50"] = ours_by[1]["ttft_p50_s"] / peer_by[1]["ttft_p50_s"]
    for level in sorted(set(ours_by) - {1}):
        out[f"aggregate_{level}_streams"] = ours_by[level]["aggregate_tokens_per_s"] / peer_by[level]["aggregate_tokens_per_s"]
    return out


def report(name: str, levels: list[dict]) -> None:
    for level in levels:
        print(f"{name:<18} x{level['concurrency']:<3} TTFT p50 {level['ttft_p50_s'] * 1000:7.1f} ms  per stream "
              f"{level['tokens_per_s_per_stream']:6.1f} tok/s  aggregate {level['aggregate_tokens_per_s']:7.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=".peer-venv/bin/python", help="python of the venv holding vLLM")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="model threads for both servers: all cores but one, which each server's front end needs")
    parser.add_argument("--dtypes", default="float32,bfloat16,bfloat16+compile",
                        help="the service is measured once per entry: a dtype, '+compile' for the compiled decode "
                        "step (measured once compiled); vLLM runs bfloat16, which it needs on a CPU")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    cpu = announce_cpu()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.preset, Path(tempfile.gettempdir()) / f"minicpm-peer-{args.preset}")

    log = args.out / "peer-server.log"
    peer_process = start_peer(args.peer_python, checkpoint, args.threads, log)
    try:
        wait_ready(f"http://127.0.0.1:{PEER_PORT}", peer_process)
        peer = measure(f"http://127.0.0.1:{PEER_PORT}", args.tokens, levels, args.rounds)
    finally:
        peer_process.terminate()
        peer_process.wait(timeout=60)
    ours, serving, result = {}, {}, {}
    for dtype in args.dtypes.split(","):
        url = start_app({
            "instruct": {"model": {"checkpoint": str(checkpoint), "max_batch_size": 16, "torch_threads": args.threads,
                                   "dtype": dtype.removesuffix("+compile"),
                                   "compile_decode": dtype.endswith("+compile")},
                         "deployment": {"num_replicas": 1, "max_queued_requests": 256,
                                        "ray_actor_options": {"num_cpus": 1}}},
            "thinking": None,
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}},
        })
        try:
            if dtype.endswith("+compile"):
                wait_compiled("decode")
            ours[dtype] = measure(url, args.tokens, levels, args.rounds)
            serving[dtype] = serving_path_cpu(url, args.tokens, 8)
        finally:
            stop_app()
        result[dtype] = ratios(ours[dtype], peer)

    report("vLLM", peer)
    for dtype in ours:
        report(f"service, {dtype}", ours[dtype])
        print(f"serving path ({dtype}), CPU per streamed token:",
              ", ".join(f"{k} = {v:.2f}" for k, v in serving[dtype].items()))
    for dtype, ratio in result.items():
        print(f"service ({dtype}) / vLLM:", ", ".join(f"{k} = {v:.2f}" for k, v in ratio.items()))
    print("targets: single_stream_tokens_per_s >= 1.0, aggregate_16_streams >= 0.8, ttft_p50 <= 1.5")
    (args.out / f"peer-{args.preset}.json").write_text(json.dumps(
        {"cpu": cpu, "checkpoint": str(checkpoint), "tokens": args.tokens, "threads": args.threads, "vllm": peer,
         "service": ours,
         "serving_path": serving, "ratios": result, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
