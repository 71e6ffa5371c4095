"""What constrained rows cost their batch: free rows' tokens/s alone and beside JSON-schema rows, in process.

    python -m benchmarks.constrained                     # small preset, 6 free rows, 2 constrained
    python -m benchmarks.constrained --preset tiny --free 8 --constrained 4 --rounds 5

Each round runs the free rows (greedy, exactly `--tokens` tokens) three ways, one after the other so
machine noise hits all alike: alone; beside `--constrained` plain sampled rows as long as the JSON
answers (what any extra rows cost); and beside as many rows answering a JSON schema of enums and booleans (sampled, so
each walks its own path through the grammar). The last two differ only by the
grammar. It prints the free rows' aggregate tokens/s in each, the grammar masks' share of the run's
wall time (time in `Masker.apply`), and checks every constrained answer against the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import jsonschema

from deployments.common.config import ModelConfig
from deployments.engine.engine import Engine
from deployments.engine.grammar import Masker
from deployments.common.types import ChatMessage, Constraint, GenerationRequest, SamplingParams
from benchmarks import announce_cpu

SCHEMA = {"type": "object", "properties": {
    "verdict": {"enum": ["approve", "reject", "escalate"]}, "urgent": {"type": "boolean"},
    "scores": {"type": "array", "items": {"enum": [1, 2, 3, 4, 5]}, "minItems": 3, "maxItems": 3},
}, "required": ["verdict", "urgent", "scores"], "additionalProperties": False}


def free_request(i: int, tokens: int) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [f"Tell story number {i}"])], enable_thinking=False,
                             sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0))


def extra_request(i: int, constrained: bool, tokens: int = 0) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=200, temperature=1.0, seed=i) if constrained else \
        SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=1.0, seed=i)
    return GenerationRequest([ChatMessage("user", [f"Review case {i}"])], enable_thinking=False, sampling=sampling,
                             constraint=Constraint("json_schema", schema=SCHEMA) if constrained else None)


async def drain(engine: Engine, request: GenerationRequest) -> str:
    return "".join([chunk.content async for chunk in engine.stream(request)])


async def answer_length(engine: Engine, rows: int) -> int:
    """Median tokens of the constrained answers (the plain rows are given as many)."""
    lengths = []
    for i in range(rows):
        chunks = [chunk async for chunk in engine.stream(extra_request(i, True))]
        lengths.append(chunks[-1].usage.completion_tokens)
    return int(statistics.median(lengths))


class MaskClock:
    """Adds up the time spent in Masker.apply (the only per-step work constrained rows add)."""

    def __init__(self) -> None:
        self.seconds, self._apply = 0.0, Masker.apply

    def __enter__(self) -> MaskClock:
        clock, apply = self, self._apply

        def timed(masker, logits, matchers):
            started = time.perf_counter()
            apply(masker, logits, matchers)
            clock.seconds += time.perf_counter() - started

        Masker.apply = timed
        return self

    def __exit__(self, *exc) -> None:
        Masker.apply = self._apply


async def one_run(engine: Engine, free: int, extra: int, tokens: int, constrained: bool = True,
                  extra_tokens: int = 0) -> tuple[float, float]:
    """(free rows' aggregate tokens/s, mask seconds over wall seconds)."""
    with MaskClock() as clock:
        started = time.perf_counter()
        jobs = [asyncio.create_task(drain(engine, free_request(i, tokens))) for i in range(free)]
        answers = [asyncio.create_task(drain(engine, extra_request(i, constrained, extra_tokens)))
                   for i in range(extra)]
        await asyncio.gather(*jobs)
        free_wall = time.perf_counter() - started
        for text in await asyncio.gather(*answers):
            if constrained:
                jsonschema.validate(json.loads(text), SCHEMA)
        wall = time.perf_counter() - started
    return free * tokens / free_wall, clock.seconds / wall


async def main_async(args: argparse.Namespace) -> None:
    engine = Engine(ModelConfig(variant="instruct", checkpoint=f"preset:{args.preset}", max_batch_size=16,
                                batch_wait_ms=100, torch_threads=args.threads))
    await one_run(engine, 2, 1, 8)  # warm-up: first grammar compile, first forwards
    json_tokens = await answer_length(engine, args.constrained)
    alone, plain, beside, share = [], [], [], []
    for _ in range(args.rounds):
        alone.append((await one_run(engine, args.free, 0, args.tokens))[0])
        plain.append((await one_run(engine, args.free, args.constrained, args.tokens, False, json_tokens))[0])
        rate, mask_share = await one_run(engine, args.free, args.constrained, args.tokens)
        beside.append(rate)
        share.append(mask_share)
    print(f"preset {args.preset}, vocab {engine.grammars.vocab_size}: {args.free} free rows x {args.tokens} tokens, "
          f"{args.rounds} rounds; free rows' aggregate tokens/s")
    print(f"  alone:                        {_spread(alone)}")
    print(f"  beside {args.constrained} plain sampled rows:   {_spread(plain)}  ({json_tokens} tokens each, "
          "as many as the JSON answers)")
    print(f"  beside {args.constrained} JSON-schema rows:     {_spread(beside)}  "
          f"(over plain rows: {statistics.median(b / p for p, b in zip(plain, beside)):.2f} median)")
    print(f"  grammar masks: {_spread([s * 100 for s in share])} % of the run's wall time; every answer valid")


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--free", type=int, default=6)
    parser.add_argument("--constrained", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    announce_cpu()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
