"""What constrained rows cost their batch: free rows' tokens/s alone and beside JSON-schema rows, in process.

    python -m benchmarks.constrained                     # small preset, 6 free rows, 2 constrained
    python -m benchmarks.constrained --preset tiny --free 8 --constrained 4 --rounds 5

Each round runs the free rows (greedy, exactly `--tokens` tokens) once alone and once together with
`--constrained` rows answering a JSON schema of enums and booleans (sampled, so each row walks its own
path through the grammar), alternating so machine noise hits both alike. It prints the free rows'
aggregate tokens/s in both runs, the grammar mask's share of the engine thread (time in
`Masker.apply` over the run's wall time), and checks every constrained answer against the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import jsonschema

from deployments.config import ModelConfig
from deployments.engine import Engine
from deployments.grammar import Masker
from deployments.types import ChatMessage, Constraint, GenerationRequest, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "verdict": {"enum": ["approve", "reject", "escalate"]}, "urgent": {"type": "boolean"},
    "scores": {"type": "array", "items": {"enum": [1, 2, 3, 4, 5]}, "minItems": 3, "maxItems": 3},
}, "required": ["verdict", "urgent", "scores"], "additionalProperties": False}


def free_request(i: int, tokens: int) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [f"Tell story number {i}"])], enable_thinking=False,
                             sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0))


def json_request(i: int) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [f"Review case {i}"])], enable_thinking=False,
                             constraint=Constraint("json_schema", schema=SCHEMA),
                             sampling=SamplingParams(max_tokens=200, temperature=1.0, seed=i))


async def drain(engine: Engine, request: GenerationRequest) -> str:
    return "".join([chunk.content async for chunk in engine.stream(request)])


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


async def one_run(engine: Engine, free: int, constrained: int, tokens: int) -> tuple[float, float]:
    """(free rows' aggregate tokens/s, mask seconds over wall seconds)."""
    with MaskClock() as clock:
        started = time.perf_counter()
        jobs = [asyncio.create_task(drain(engine, free_request(i, tokens))) for i in range(free)]
        answers = [asyncio.create_task(drain(engine, json_request(i))) for i in range(constrained)]
        await asyncio.gather(*jobs)
        free_wall = time.perf_counter() - started
        for text in await asyncio.gather(*answers):
            jsonschema.validate(json.loads(text), SCHEMA)
        wall = time.perf_counter() - started
    return free * tokens / free_wall, clock.seconds / wall


async def main_async(args: argparse.Namespace) -> None:
    engine = Engine(ModelConfig(variant="instruct", checkpoint=f"preset:{args.preset}", max_batch_size=16,
                                batch_wait_ms=100, torch_threads=args.threads))
    await one_run(engine, 2, 1, 8)  # warm-up: first grammar compile, first forwards
    alone, beside, share = [], [], []
    for _ in range(args.rounds):
        alone.append((await one_run(engine, args.free, 0, args.tokens))[0])
        rate, mask_share = await one_run(engine, args.free, args.constrained, args.tokens)
        beside.append(rate)
        share.append(mask_share)
    print(f"preset {args.preset}, vocab {engine.grammars.vocab_size}: {args.free} free rows x {args.tokens} tokens, "
          f"{args.rounds} rounds")
    print(f"  free rows alone:            {_spread(alone)} tok/s")
    print(f"  beside {args.constrained} JSON-schema rows:  {_spread(beside)} tok/s "
          f"(ratio {statistics.median(b / a for a, b in zip(alone, beside)):.2f} median)")
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
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
