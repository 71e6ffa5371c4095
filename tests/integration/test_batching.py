"""Concurrent requests generated together in one batched `generate`, on the real tiny checkpoint."""

from __future__ import annotations

import asyncio
import time

import pytest
from PIL import Image

from deployments.config import ModelConfig
from deployments.engine import Engine
from deployments.types import ChatMessage, GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def batched(tiny_checkpoints) -> Engine:
    # A long wait makes requests submitted together land in one batch, deterministically.
    return Engine(ModelConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]),
                              max_batch_size=8, batch_wait_ms=300))


@pytest.fixture(scope="module")
def one_at_a_time(tiny_checkpoints) -> Engine:
    return Engine(ModelConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), max_batch_size=1))


def requests() -> list[GenerationRequest]:
    images = [Image.new("RGB", (300, 200), "red"), Image.new("RGB", (120, 500), "blue")]
    contents = [["hello"], [images[0], "what is this"], ["a much longer question about the weather today"],
                [images[1], images[0], "compare"], ["short"]]
    return [GenerationRequest([ChatMessage("user", c)], enable_thinking=False,
                              sampling=SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0),
                              request_id=f"r{i}") for i, c in enumerate(contents)]


async def run(engine: Engine, request: GenerationRequest) -> tuple[str, list]:
    chunks = [chunk async for chunk in engine.stream(request)]
    return "".join(c.content for c in chunks), chunks


async def test_batched_greedy_outputs_equal_each_request_run_alone(batched, one_at_a_time):
    alone = [await run(one_at_a_time, r) for r in requests()]
    together = await asyncio.gather(*(run(batched, r) for r in requests()))
    assert batched.runner.batch_sizes[-1] == 5, "all five requests ran in one batch"
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert [c[-1].usage for _, c in together] == [c[-1].usage for _, c in alone]


async def test_seeded_sampling_in_a_batch_matches_the_same_request_alone(batched, one_at_a_time):
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest([ChatMessage("user", [f"seed {seed}"])], enable_thinking=False,
                                 sampling=SamplingParams(max_tokens=15, min_tokens=15, temperature=1.0, seed=seed))

    alone = [(await run(one_at_a_time, sampled(s)))[0] for s in (1, 2, 3)]
    together = [text for text, _ in await asyncio.gather(*(run(batched, sampled(s)) for s in (1, 2, 3)))]
    assert together == alone and len(set(alone)) == 3


async def test_each_row_stops_on_its_own(batched):
    limits = [3, 10, 25]
    rows = [GenerationRequest([ChatMessage("user", ["go"])], enable_thinking=False,
                              sampling=SamplingParams(max_tokens=n, min_tokens=n)) for n in limits]
    results = await asyncio.gather(*(run(batched, r) for r in rows))
    assert batched.runner.batch_sizes[-1] == 3
    assert [chunks[-1].usage.completion_tokens for _, chunks in results] == limits
    assert {chunks[-1].finish_reason for _, chunks in results} == {"length"}


async def test_a_stop_string_ends_only_its_own_row(batched, one_at_a_time):
    probe = GenerationRequest([ChatMessage("user", ["stop test"])], enable_thinking=False,
                              sampling=SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0))
    full, _ = await run(one_at_a_time, probe)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    stopped = GenerationRequest(probe.messages, False, SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0,
                                                                      stop=[stop]))
    other = GenerationRequest([ChatMessage("user", ["another"])], False, SamplingParams(max_tokens=20, min_tokens=20))
    (text, chunks), (_, other_chunks) = await asyncio.gather(run(batched, stopped), run(batched, other))
    assert text == full[: full.index(stop)] and chunks[-1].finish_reason == "stop"
    assert other_chunks[-1].usage.completion_tokens == 20


async def test_cancelling_one_row_leaves_the_others_running(batched):
    long = GenerationRequest([ChatMessage("user", ["long"])], False, SamplingParams(max_tokens=2000, min_tokens=2000))
    rows = [GenerationRequest([ChatMessage("user", [f"row {i}"])], False, SamplingParams(max_tokens=40, min_tokens=40))
            for i in range(2)]

    async def read_a_little() -> int:
        count = 0
        async for _ in batched.stream(long):
            count += 1
            if count == 3:
                break  # closing the generator cancels this row
        return count

    results = await asyncio.gather(read_a_little(), *(run(batched, r) for r in rows))
    assert batched.runner.batch_sizes[-1] == 3
    assert [chunks[-1].usage.completion_tokens for _, chunks in results[1:]] == [40, 40]
    deadline = time.monotonic() + 2
    while batched.running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert batched.running == 0


async def test_a_batch_of_one_still_streams_token_by_token(one_at_a_time):
    request = GenerationRequest([ChatMessage("user", ["stream"])], False, SamplingParams(max_tokens=30, min_tokens=30))
    arrivals = []
    async for chunk in one_at_a_time.stream(request):
        arrivals.append(time.monotonic())
    assert len(arrivals) >= 10 and arrivals[-1] - arrivals[0] > 0
    both = await asyncio.gather(*(run(one_at_a_time, request) for _ in range(2)))
    assert one_at_a_time.runner.batch_sizes[-2:] == [1, 1]
    assert both[0][0] == both[1][0]
