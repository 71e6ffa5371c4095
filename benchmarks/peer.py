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


def settings(name: str) -> dict:
    """'defaults' -> {}; 'key=value,key=value' -> the model settings (values parsed as YAML scalars)."""
    import yaml

    if name == "defaults":
        return {}
    return {key.strip(): yaml.safe_load(value) for key, value in (item.split("=", 1) for item in name.split(","))}


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
    parser.add_argument("--service", default="defaults",
                        help="the service configurations to measure, separated by ';': 'defaults' (the model "
                        "settings' defaults, only max_batch_size 16 set), or settings over them, e.g. "
                        "'torch_threads=1,compile_decode=false'. A compiled decode step is measured once compiled")
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
    for name in args.service.split(";"):
        model = {"checkpoint": str(checkpoint), "max_batch_size": 16, **settings(name)}
        started = time.monotonic()
        url = start_app({
            "instruct": {"model": model,
                         "deployment": {"num_replicas": 1, "max_queued_requests": 256,
                                        "ray_actor_options": {"num_cpus": 1}}},
            "thinking": None,
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}},
        })
        print(f"service ({name}) ready in {time.monotonic() - started:.0f} s", flush=True)
        try:
            if model.get("compile_decode", True):
                wait_compiled("decode")
            ours[name] = measure(url, args.tokens, levels, args.rounds)
            serving[name] = serving_path_cpu(url, args.tokens, 8)
        finally:
            stop_app()
        result[name] = ratios(ours[name], peer)

    report("vLLM", peer)
    for name in ours:
        report(f"service, {name}", ours[name])
        print(f"serving path ({name}), CPU per streamed token:",
              ", ".join(f"{k} = {v:.2f}" for k, v in serving[name].items()))
    for name, ratio in result.items():
        print(f"service ({name}) / vLLM:", ", ".join(f"{k} = {v:.2f}" for k, v in ratio.items()))
        by_level = {level["concurrency"]: level for level in ours[name]}
        if 1 in by_level and 8 in by_level:
            print(f"service ({name}): aggregate at 8 streams / one stream = "
                  f"{by_level[8]['aggregate_tokens_per_s'] / by_level[1]['aggregate_tokens_per_s']:.2f}")
    print("targets (at the defaults): single_stream_tokens_per_s >= 1.5, aggregate_16_streams >= 1.2, "
          "ttft_p50 <= 1.0; aggregate at 8 streams >= 4x one stream")
    (args.out / f"peer-{args.preset}.json").write_text(json.dumps(
        {"cpu": cpu, "checkpoint": str(checkpoint), "tokens": args.tokens, "threads": args.threads, "vllm": peer,
         "service": ours,
         "serving_path": serving, "ratios": result, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
