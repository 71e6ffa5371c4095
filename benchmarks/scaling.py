"""How a config's application scales with concurrent streams: aggregate tokens/s at N streams over one.

    python -m benchmarks.scaling                          # the embedded default, serve_config.yaml
    python -m benchmarks.scaling --config my_config.yaml --concurrency 1,8,16

It deploys the first application of the config file as it is (same args, same replicas and
autoscaling), streams greedy requests of exactly `--tokens` tokens from N clients back to back
over one keep-alive pool (the client of benchmarks.throughput), and prints each level's numbers
and the ratio of each aggregate to one stream's. Autoscaling is left on: a level runs long
enough (`--rounds`) for added replicas to count, as they would for users.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import yaml

from benchmarks.service import start_app, stop_app
from benchmarks.throughput import over_http
from benchmarks import announce_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends per level")
    args = parser.parse_args()
    announce_cpu()
    app_args = yaml.safe_load(args.config.read_text())["applications"][0]["args"]
    url = start_app(app_args)
    try:
        levels = [asyncio.run(over_http(url, args.tokens, int(c), args.rounds)) for c in args.concurrency.split(",")]
    finally:
        stop_app()
    single = levels[0]["aggregate_tokens_per_s"]
    for level in levels:
        print(f"x{level['concurrency']:<3} TTFT p50 {level['ttft_p50_s'] * 1000:7.1f} ms  per stream "
              f"{level['tokens_per_s_per_stream']:6.1f} tok/s  aggregate {level['aggregate_tokens_per_s']:7.1f} tok/s"
              f"  ({level['aggregate_tokens_per_s'] / single:.2f} x the first level)")


if __name__ == "__main__":
    main()
