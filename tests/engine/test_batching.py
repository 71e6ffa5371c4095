"""Concurrent requests generated together in one batch, on the real tiny checkpoint: rows that start
together, rows that join a running batch, rows that leave it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from PIL import Image

from deployments.engine.engine import Engine
from deployments.engine.rows import Row
from deployments.engine.sampling import RowSampling
from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams
from tests.kinds import EXACT_DTYPE, EagerConfig  # these tests compare tokens exactly
from tests.waiting import wait_until_async


@pytest.fixture(scope="module")
def batched(tiny_checkpoints) -> Engine:
    # A long wait makes requests submitted together land in one batch, deterministically.
    return Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]),
                              dtype=EXACT_DTYPE, max_batch_size=8, batch_wait_ms=300))


@pytest.fixture(scope="module")
def static(tiny_checkpoints) -> Engine:
    return Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]),
                              dtype=EXACT_DTYPE, max_batch_size=8, batch_wait_ms=300, continuous_batching=False))


@pytest.fixture(scope="module")
def one_at_a_time(tiny_checkpoints) -> Engine:
    return Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), dtype=EXACT_DTYPE,
                              max_batch_size=1))


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


def plain_generate(engine: Engine, request: GenerationRequest) -> tuple[str, int]:
    """The reference: the processor and `model.generate` alone, greedy (text, prompt tokens)."""
    parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
             for p in request.messages[0].content]
    inputs = engine.processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", enable_thinking=False)
    tokens = request.sampling.max_tokens
    out = engine.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    return engine.tokenizer.decode(out[0, prompt:], skip_special_tokens=True), prompt


async def test_batched_greedy_outputs_equal_plain_generate_run_alone(batched):
    reference = [plain_generate(batched, r) for r in requests()]
    together = await asyncio.gather(*(run(batched, r) for r in requests()))
    assert batched.core.batch_sizes[-1] == 5, "all five requests ran in one batch"
    assert [text for text, _ in together] == [text for text, _ in reference]
    assert [c[-1].usage.prompt_tokens for _, c in together] == [prompt for _, prompt in reference]
    assert all(c[-1].usage.completion_tokens == 12 for _, c in together)


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
    assert batched.core.batch_sizes[-1] == 3
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

    cancelled, steps = batched.core.cancelled_rows, batched.core.decode_steps
    results = await asyncio.gather(read_a_little(), *(run(batched, r) for r in rows))
    assert batched.core.batch_sizes[-1] == 3
    assert [chunks[-1].usage.completion_tokens for _, chunks in results[1:]] == [40, 40]
    await wait_until_async(lambda: batched.running == 0, what="the cancelled row to leave")
    assert batched.core.cancelled_rows - cancelled == 1, "only the closed row left as cancelled"
    assert batched.core.decode_steps - steps < 200, "it left long before its 2000 tokens"


async def test_a_batch_of_one_still_streams_token_by_token(one_at_a_time):
    request = GenerationRequest([ChatMessage("user", ["stream"])], False, SamplingParams(max_tokens=200, min_tokens=200))
    still_running = []  # at each chunk's arrival: is the row still generating?
    async for chunk in one_at_a_time.stream(request):
        still_running.append(one_at_a_time.running == 1)
    assert len(still_running) >= 10 and all(still_running[:3]), "chunks must arrive while the row generates"
    both = await asyncio.gather(*(run(one_at_a_time, request) for _ in range(2)))
    assert one_at_a_time.core.batch_sizes[-2:] == [1, 1]
    assert both[0][0] == both[1][0]


def ask(content: list, tokens: int, **sampling) -> GenerationRequest:
    """A request for exactly `tokens` tokens, greedy unless `sampling` says otherwise."""
    sampling = {"temperature": 0.0, **sampling}
    return GenerationRequest([ChatMessage("user", content)], enable_thinking=False,
                             sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, **sampling))


async def lead(engine: Engine, request: GenerationRequest, started: asyncio.Event, after_chunks: int = 3,
               done: asyncio.Event | None = None) -> str:
    """Stream `request`, setting `started` once `after_chunks` chunks arrived (and `done` at the end); its text."""
    text, seen = "", 0
    async for chunk in engine.stream(request):
        text, seen = text + chunk.content, seen + 1
        if seen == after_chunks:
            started.set()
    if done is not None:
        done.set()
    return text


async def run_joining_after(engine: Engine, first: GenerationRequest, later: list[GenerationRequest],
                            after_chunks: int = 3) -> list[str]:
    """Start `first`; once it has streamed `after_chunks` chunks, send `later` (they join its batch)."""
    started = asyncio.Event()

    async def follow(request: GenerationRequest) -> str:
        await started.wait()
        return (await run(engine, request))[0]

    return list(await asyncio.gather(lead(engine, first, started, after_chunks), *(follow(r) for r in later)))


async def test_requests_joining_a_running_batch_get_the_same_greedy_output_as_alone(batched, one_at_a_time):
    image = Image.new("RGB", (300, 200), "green")
    first = ask(["a long answer please"], 60)
    later = [ask(["hi"], 20), ask([image, "describe this picture in detail, thoroughly"], 25), ask(["more"], 8)]
    alone = [(await run(one_at_a_time, r))[0] for r in [first, *later]]
    sizes_before = len(batched.core.batch_sizes)
    together = await run_joining_after(batched, first, later)
    sizes = batched.core.batch_sizes[sizes_before:]
    assert sizes[0] == 1 and max(sizes) == 4, f"the later requests joined the first one's batch: {sizes}"
    assert together == alone


async def test_rows_leave_and_join_while_others_run(batched, one_at_a_time):
    """The longest prompt finishes first (its padding columns go), a newcomer joins, another row runs throughout."""
    longest = ask(["a much longer question about the weather today, tomorrow and the day after"], 4)
    steady = ask(["steady"], 50)
    newcomer = ask(["newcomer"], 15, temperature=1.0, seed=7)
    alone = [(await run(one_at_a_time, r))[0] for r in (steady, longest, newcomer)]
    sizes_before = len(batched.core.batch_sizes)
    together = await run_joining_after(batched, steady, [longest])
    after = await run_joining_after(batched, steady, [newcomer], after_chunks=10)
    assert batched.core.batch_sizes[sizes_before:] == [1, 2, 1, 2]
    assert together == alone[:2] and after == [alone[0], alone[2]]


async def test_without_continuous_batching_newcomers_wait_for_the_running_batch(static, one_at_a_time):
    first, later = ask(["first"], 40), [ask(["second"], 10)]
    alone = [(await run(one_at_a_time, r))[0] for r in [first, *later]]
    sizes_before = len(static.core.batch_sizes)
    together = await run_joining_after(static, first, later)
    assert static.core.batch_sizes[sizes_before:] == [1, 1]
    assert together == alone


async def test_a_newcomer_whose_prefill_fails_leaves_the_running_rows_untouched(batched, one_at_a_time):
    steady = ask(["steady"], 40)
    alone = (await run(one_at_a_time, steady))[0]
    started = asyncio.Event()

    async def broken() -> None:
        await started.wait()
        prepared = batched.prepare(ask(["broken"], 5))
        prepared.inputs["input_ids"][0, -1] = batched.model.config.get_text_config().vocab_size + 100  # no such token
        row = Row(prepared.inputs, RowSampling(), 5, prepared.eos_ids, asyncio.get_running_loop())
        batched.core.submit([row])
        with pytest.raises(IndexError):
            async for _ in row:
                pass

    text, _ = await asyncio.gather(lead(batched, steady, started), broken())
    assert text == alone


async def test_a_finished_row_stops_costing_compute_while_the_others_decode(batched, static):
    for engine, rows_left in ((batched, 1), (static, 1)):
        short_done = asyncio.Event()
        counts = []

        async def short() -> None:
            await run(engine, ask(["short"], 3))
            short_done.set()

        async def long() -> None:
            async for _ in engine.stream(ask(["long"], 300)):
                if short_done.is_set() and len(counts) < 20:
                    counts.append(engine.core.rows_in_batch)

        await asyncio.gather(short(), long())
        assert counts and counts[-1] == rows_left, f"rows in the batch after the short request ended: {counts}"


async def test_cancelling_a_row_that_joined_leaves_the_running_row_untouched(batched, one_at_a_time):
    steady = ask(["steady"], 300)
    alone = (await run(one_at_a_time, steady))[0]
    started, lead_done = asyncio.Event(), asyncio.Event()

    async def join_then_leave() -> list[int]:
        await started.wait()
        seen = 0
        async for _ in batched.stream(ask(["joins, then leaves"], 2000)):
            seen += 1
            if seen == 2:
                break  # closing the generator cancels this row
        rows = [batched.core.rows_in_batch]
        while rows[-1] == 2 and not lead_done.is_set():
            await asyncio.sleep(0.005)
            rows.append(batched.core.rows_in_batch)
        assert not lead_done.is_set(), "the cancelled row left while the other one was still generating"
        return rows

    text, rows = await asyncio.gather(lead(batched, steady, started, done=lead_done), join_then_leave())
    assert rows[0] == 2 and rows[-1] == 1
    assert text == alone


async def test_a_prompt_that_fails_in_a_prefill_group_fails_alone(batched, one_at_a_time):
    """Requests prefilled together with one that cannot be: the group is retried one by one."""
    good = [ask(["first good"], 10), ask(["second good"], 10)]
    alone = [(await run(one_at_a_time, r))[0] for r in good]
    prepared = batched.prepare(ask(["broken"], 5))
    prepared.inputs["input_ids"][0, -1] = batched.model.config.get_text_config().vocab_size + 100  # no such token
    broken = Row(prepared.inputs, RowSampling(), 5, prepared.eos_ids, asyncio.get_running_loop())

    async def run_broken() -> None:
        batched.core.submit([broken])
        with pytest.raises(IndexError):
            async for _ in broken:
                pass

    sizes_before = len(batched.core.batch_sizes)
    together = await asyncio.gather(run_broken(), *(run(batched, r) for r in good))
    assert batched.core.batch_sizes[sizes_before] == 3, "all three were prefilled as one group first"
    assert [text for text, _ in together[1:]] == alone


async def test_rows_with_extreme_sampling_values_leave_their_batch_mates_unchanged(batched, one_at_a_time):
    normal = [ask([f"normal {i}"], 15) for i in range(3)]
    alone = [(await run(one_at_a_time, r))[0] for r in normal]
    hostile = [ask(["hostile"], 15, temperature=t, top_p=p, top_k=k, repetition_penalty=r, seed=s)
               for t, p, k, r, s in ((1e-30, 1e-30, 10**9, 1e-30, 2**64 - 1), (2.0, 1.0, 0, 1e-30, -(2**63)))]
    results = await asyncio.gather(*(run(batched, r) for r in [*hostile, *normal]))
    assert [chunks[-1].usage.completion_tokens for _, chunks in results[:2]] == [15, 15]
    assert [text for text, _ in results[2:]] == alone


async def test_a_request_that_fits_starts_past_an_n_request_that_does_not(batched):
    """A long stream runs; an n=8 request cannot fit beside it; a short request sent after it starts anyway
    (and ends while the long stream still runs), and the n=8 request starts once the batch has room."""
    long_done, started = asyncio.Event(), asyncio.Event()
    wide = ask(["eight at once"], 6)
    wide = dataclasses.replace(wide, sampling=dataclasses.replace(wide.sampling, n=8))
    order: list[str] = []

    async def after_start(name: str, request: GenerationRequest) -> None:
        await started.wait()
        if name == "short":
            await wait_until_async(lambda: batched.core.running >= 9, what="the n=8 request waiting")
        await run(batched, request)
        order.append(name)

    async def first() -> None:
        await lead(batched, ask(["a long answer please"], 600), started, done=long_done)
        order.append("long")

    passed = batched.core.scheduler.passed_over
    await asyncio.gather(first(), after_start("wide", wide), after_start("short", ask(["hi"], 5)))
    assert order == ["short", "long", "wide"], order
    assert batched.core.scheduler.passed_over == passed + 1
