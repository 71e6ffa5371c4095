"""The real Engine on the built-in tiny checkpoints: loading, prompt rendering and streaming generation.

Nothing here is mocked: each test runs `deployments.engine.engine.Engine` with the real transformers
model and processor. Token counts are observed with a forward hook on the model (one forward
per generated token), which watches the model without changing it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
import numpy as np
import pytest
import torch
from PIL import Image

from deployments.common.config import ModelConfig
from deployments.engine.checkpoint import RowAdaptiveLinear, cpu_has_native_bf16
from deployments.engine.engine import Engine
from deployments.common.errors import CheckpointError, ContextLengthError
from deployments.common.types import ChatMessage, Chunk, GenerationRequest, SamplingParams, Video
from tests.kinds import EXACT_DTYPE, EagerConfig  # streamed text is compared with generate's exactly
from tests.waiting import wait_until_async

# ---------------------------------------------------------------------------- fixtures and helpers

# One intra-op thread: as fast as two for the tiny model, and immune to the 10x slowdowns that
# two spinning OpenMP threads suffer when another process competes for the 2 cores.
THREADS = 1


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def engine_config(checkpoint, variant: str = "instruct", **overrides) -> ModelConfig:
    return EagerConfig(variant=variant, checkpoint=str(checkpoint), torch_threads=THREADS,
                       **{"dtype": EXACT_DTYPE, **overrides})


@pytest.fixture(scope="module")
def instruct(tiny_checkpoints) -> Engine:
    return Engine(engine_config(tiny_checkpoints["instruct"]))


@pytest.fixture(scope="module")
def thinking(tiny_checkpoints) -> Engine:
    return Engine(engine_config(tiny_checkpoints["thinking"], "thinking"))


@pytest.fixture(scope="module")
def long_context(tiny_checkpoints) -> Engine:
    """Instruct engine whose limit admits max_tokens=5000 (the tiny preset's own context is 4096)."""
    return Engine(engine_config(tiny_checkpoints["instruct"], max_model_len=8192))


@pytest.fixture(scope="module")
def red_image() -> Image.Image:
    return Image.new("RGB", (200, 150), (200, 30, 30))


@pytest.fixture(scope="module")
def tall_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Video:
    """A 2 s, 20-frame 160x120 H.264 clip written with PyAV, sampled to 4 frames with decord."""
    import av
    import decord

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(20):
            frame = np.zeros((120, 160, 3), np.uint8)
            frame[..., 0] = i * 12
            frame[i * 5:i * 5 + 20, i * 7:i * 7 + 20] = 255  # a moving white square
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    reader = decord.VideoReader(str(path))
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = list(range(0, total, 5))
    frames = reader.get_batch(indices).asnumpy()
    assert frames.shape == (4, 120, 160, 3) and total == 20
    return Video(frames=frames, fps=fps, duration=total / fps, frame_indices=indices, total_num_frames=total)


def request(*content, enable_thinking: bool = False, history: list[ChatMessage] | None = None,
            **sampling) -> GenerationRequest:
    messages = [*(history or []), ChatMessage("user", list(content))]
    return GenerationRequest(messages=messages, enable_thinking=enable_thinking, sampling=SamplingParams(**sampling))


async def collect(engine: Engine, req: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(req)]


def content(chunks: list[Chunk]) -> str:
    return "".join(c.content for c in chunks)


def reasoning(chunks: list[Chunk]) -> str:
    return "".join(c.reasoning for c in chunks)


@contextmanager
def forward_counter(engine: Engine) -> Iterator[list[int]]:
    """Counts the forwards the engine's model runner runs: [all, decode steps]. Observes only."""
    calls, runner = [0, 0], engine.core.runner
    prefill_chunk, decode = runner.prefill_chunk, runner.decode

    def counted(forward, is_decode: bool):
        def run(*args):
            calls[0] += 1
            calls[1] += is_decode
            return forward(*args)
        return run

    runner.prefill_chunk, runner.decode = counted(prefill_chunk, False), counted(decode, True)
    try:
        yield calls
    finally:
        runner.prefill_chunk, runner.decode = prefill_chunk, decode


async def wait_idle(engine: Engine, timeout: float = 1.0) -> float:
    """Seconds until no generation thread is alive; fails after `timeout`."""
    started = time.monotonic()
    await wait_until_async(lambda: engine.running == 0, timeout=timeout, what="every generation to stop")
    return time.monotonic() - started


# ---------------------------------------------------------------------------- streaming shape and usage


async def test_text_request_streams_text_chunks_then_one_final_chunk_with_usage(instruct):
    req = request("Hello there", max_tokens=24)
    with forward_counter(instruct) as forwards:
        chunks = await collect(instruct, req)
    await wait_idle(instruct)

    *text_chunks, final = chunks
    assert len(text_chunks) >= 5, "tokens must arrive as several chunks, not one block"
    assert all(c.finish_reason is None and c.usage is None for c in text_chunks)
    assert all(c.content or c.reasoning for c in text_chunks), "only the last chunk may be empty"
    assert final.finish_reason in ("stop", "length")
    assert (final.finish_reason == "length") == (final.usage.completion_tokens == 24)
    assert final.content == "" and final.reasoning == ""
    assert final.usage.prompt_tokens == instruct.prepare(req).prompt_tokens > 0
    # The prefill samples the first token (chunked at the end of the user turn, for the prefix cache), then
    # one decode forward per token.
    assert final.usage.completion_tokens == forwards[1] + 1, "one decode forward per generated token after the first"
    assert 0 < final.usage.completion_tokens <= 24
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


@pytest.mark.parametrize("n", [1, 17])
async def test_min_tokens_equal_to_max_tokens_gives_exactly_that_many_tokens(instruct, n):
    chunks = await collect(instruct, request("Count for me", max_tokens=n, min_tokens=n))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == n


# ---------------------------------------------------------------------------- images and video


async def test_images_generate_and_each_image_adds_prompt_tokens(instruct, red_image, tall_image):
    text_only = await collect(instruct, request("What is shown?", max_tokens=8, min_tokens=8))
    one = await collect(instruct, request(red_image, "What is shown?", max_tokens=8, min_tokens=8))
    two = await collect(instruct, request(red_image, "What is shown?", tall_image, max_tokens=8, min_tokens=8))

    for chunks in (one, two):
        assert chunks[-1].usage.completion_tokens == 8
        assert content(chunks), "an image request must produce text"
    prompt = [c[-1].usage.prompt_tokens for c in (text_only, one, two)]
    assert prompt[0] < prompt[1] < prompt[2], prompt


async def test_images_reach_the_model_as_pixels(instruct, red_image, tall_image):
    prepared = instruct.prepare(request(red_image, "Compare", tall_image))
    ids = prepared.inputs["input_ids"][0].tolist()
    assert "pixel_values" in prepared.inputs
    assert instruct.model.config.image_token_id in ids


async def test_image_in_an_earlier_turn_is_kept_in_the_prompt(instruct, red_image):
    history = [ChatMessage("user", [red_image, "What colour is this?"]), ChatMessage("assistant", ["Red."])]
    with_image = request("And what shape?", history=history, max_tokens=10, min_tokens=10)
    without_image = request("And what shape?", max_tokens=10, min_tokens=10,
                            history=[ChatMessage("user", ["What colour is this?"]), ChatMessage("assistant", ["Red."])])

    chunks = await collect(instruct, with_image)
    assert chunks[-1].usage.completion_tokens == 10
    assert content(chunks)
    assert chunks[-1].usage.prompt_tokens > instruct.prepare(without_image).prompt_tokens
    assert "pixel_values" in instruct.prepare(with_image).inputs


async def test_video_generates_and_adds_prompt_tokens(instruct, video):
    text_only = instruct.prepare(request("What happens in the video?"))
    req = request(video, "What happens in the video?", max_tokens=10, min_tokens=10)

    prepared = instruct.prepare(req)
    assert "pixel_values_videos" in prepared.inputs
    assert instruct.model.config.video_token_id in prepared.inputs["input_ids"][0].tolist()

    chunks = await collect(instruct, req)
    assert chunks[-1].usage.completion_tokens == 10
    assert content(chunks)
    assert chunks[-1].usage.prompt_tokens > text_only.prompt_tokens


# ---------------------------------------------------------------------------- thinking on and off


def test_thinking_variant_prompt_opens_a_think_block_only_when_thinking_is_on(thinking):
    on = thinking.prepare(request("Why is the sky blue?", enable_thinking=True))
    off = thinking.prepare(request("Why is the sky blue?", enable_thinking=False))
    on_text = thinking.tokenizer.decode(on.inputs["input_ids"][0])
    off_text = thinking.tokenizer.decode(off.inputs["input_ids"][0])

    assert on_text != off_text
    assert on_text.endswith("<|im_start|>assistant\n<think>\n")
    assert off_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.opens_think_block and not off.opens_think_block


def test_instruct_variant_prompt_differs_with_thinking(instruct):
    on = instruct.prepare(request("Why is the sky blue?", enable_thinking=True))
    off = instruct.prepare(request("Why is the sky blue?", enable_thinking=False))
    on_text = instruct.tokenizer.decode(on.inputs["input_ids"][0])
    off_text = instruct.tokenizer.decode(off.inputs["input_ids"][0])

    # The real template opens a think block for both variants when thinking is on.
    assert on_text.endswith("<|im_start|>assistant\n<think>\n")
    assert off_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.opens_think_block and not off.opens_think_block


async def test_thinking_on_streams_text_as_reasoning(thinking):
    req = request("Why is the sky blue?", enable_thinking=True, max_tokens=30, min_tokens=30)
    chunks = await collect(thinking, req)

    assert reasoning(chunks), "the template opened a think block: text must go to reasoning"
    first_text = next(c for c in chunks if c.content or c.reasoning)
    assert first_text.reasoning and not first_text.content

    # Only a generated </think> may move text to content: check against the raw greedy ids.
    prepared = thinking.prepare(req)
    ids = thinking.model.generate(**prepared.inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    raw = thinking.tokenizer.decode(ids[0, prepared.prompt_tokens:], skip_special_tokens=True)
    answer = raw.split("</think>", 1)[1].lstrip() if "</think>" in raw else ""
    assert content(chunks) == answer


async def test_thinking_off_streams_all_text_as_content(thinking):
    chunks = await collect(thinking, request("Why is the sky blue?", enable_thinking=False, max_tokens=30, min_tokens=30))
    assert content(chunks)
    assert reasoning(chunks) == ""
    assert all(c.reasoning == "" for c in chunks)


# ---------------------------------------------------------------------------- cancellation


async def test_closing_the_stream_stops_generation(long_context):
    engine = long_context
    with forward_counter(engine) as forwards:
        agen = engine.stream(request("Tell me a long story", max_tokens=5000, min_tokens=5000))
        received = [await agen.__anext__() for _ in range(3)]
        assert engine.running == 1
        at_close = forwards[0]
        await agen.aclose()
        await wait_idle(engine, timeout=1.0)
        stopped_at = forwards[0]
        await asyncio.sleep(0.1)
        assert forwards[0] == stopped_at, "no forward may run after the generation thread ended"

    assert all(c.finish_reason is None for c in received)
    assert stopped_at < 250, f"{stopped_at} tokens generated for a stream closed after 3 chunks"
    assert stopped_at - at_close <= 3, "generation must stop within a decode step or two of the close"
    assert engine.core.cancel_lags[-1] <= 1, "the row leaves at the first decode step after its cancel"


async def test_cancelling_the_consumer_task_stops_generation(long_context):
    engine = long_context
    got_chunks = asyncio.Event()
    received: list[Chunk] = []

    async def consume() -> None:
        async for chunk in engine.stream(request("Tell me a long story", max_tokens=5000, min_tokens=5000)):
            received.append(chunk)
            if len(received) == 3:
                got_chunks.set()

    with forward_counter(engine) as forwards:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_chunks.wait(), timeout=10)
        assert engine.running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine, timeout=1.0)
        stopped_at = forwards[0]
        await asyncio.sleep(0.1)
        assert forwards[0] == stopped_at

    assert stopped_at < 250, f"{stopped_at} tokens generated for a stream cancelled after 3 chunks"


async def test_engine_answers_again_after_a_cancelled_stream(long_context):
    agen = long_context.stream(request("Tell me a long story", max_tokens=5000, min_tokens=5000))
    await agen.__anext__()
    await agen.aclose()
    chunks = await collect(long_context, request("Hello", max_tokens=6, min_tokens=6))
    assert chunks[-1].usage.completion_tokens == 6
    await wait_idle(long_context)


# ---------------------------------------------------------------------------- sampling and stop strings


async def test_same_seed_gives_same_text_and_other_seed_differs(instruct):
    def sampled(seed: int) -> GenerationRequest:
        return request("Write a poem", temperature=1.0, seed=seed, max_tokens=32, min_tokens=32)

    first = content(await collect(instruct, sampled(7)))
    again = content(await collect(instruct, sampled(7)))
    other = content(await collect(instruct, sampled(8)))
    greedy = content(await collect(instruct, request("Write a poem", temperature=0.0, max_tokens=32, min_tokens=32)))

    assert first == again
    assert first != other
    assert first != greedy, "temperature 1.0 must sample, not decode greedily"


async def test_stop_string_ends_output_before_it(instruct):
    full = content(await collect(instruct, request("Say something", max_tokens=40, min_tokens=40)))
    # A few plain letters from the middle of the answer, taken at their first occurrence.
    stop = next(
        full[i:i + 4] for i in range(len(full) // 3, len(full) - 4)
        if full[i:i + 4].isascii() and full[i:i + 4].isalpha() and full.find(full[i:i + 4]) == i
    )
    expected = full[: full.find(stop)]

    chunks = await collect(instruct, request("Say something", max_tokens=40, min_tokens=40, stop=[stop]))
    assert content(chunks) == expected
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens < 40, "generation must end at the stop string"
    await wait_idle(instruct)


async def test_stream_text_equals_decoding_direct_generate(instruct, red_image):
    for req in (request("Hello there", max_tokens=48, min_tokens=48),
                request(red_image, "Describe it", max_tokens=48, min_tokens=48)):
        streamed = await collect(instruct, req)
        prepared = instruct.prepare(req)
        ids = instruct.model.generate(**prepared.inputs, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        new_ids = ids[0, prepared.prompt_tokens:]
        direct = instruct.tokenizer.decode(new_ids, skip_special_tokens=True)

        assert streamed[-1].usage.completion_tokens == len(new_ids) == 48
        assert content(streamed) == direct


async def test_bfloat16_engine_streams_what_generate_gives(tiny_checkpoints, red_image):
    engine = Engine(engine_config(tiny_checkpoints["instruct"], dtype="bfloat16"))
    assert engine.model.dtype == torch.bfloat16
    adaptive = [m for m in engine.model.modules() if isinstance(m, RowAdaptiveLinear)]
    # On a CPU that emulates bf16 every linear layer reads bf16 weights for one row, fp32 ones for several.
    assert bool(adaptive) == (not cpu_has_native_bf16())
    rows_per_call: list[int] = []
    hook = engine.model.lm_head.register_forward_hook(lambda m, args, out: rows_per_call.append(args[0].numel() // args[0].shape[-1]))
    try:
        for req in (request("Hello there", max_tokens=24, min_tokens=24),
                    request(red_image, "Describe it", max_tokens=24, min_tokens=24)):
            streamed = await collect(engine, req)
            prepared = engine.prepare(req)
            ids = engine.model.generate(**prepared.inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            assert content(streamed) == engine.tokenizer.decode(ids[0, prepared.prompt_tokens:], skip_special_tokens=True)
            assert streamed[-1].usage.completion_tokens == 24
        two = await asyncio.gather(*(collect(engine, request(text, max_tokens=24, min_tokens=24))
                                     for text in ("Hello there", "Something else")))
    finally:
        hook.remove()
    assert all(chunks[-1].usage.completion_tokens == 24 for chunks in two)
    assert 1 in rows_per_call and max(rows_per_call) > 1, "decode steps of one row and of several ran"


# ---------------------------------------------------------------------------- limits and loading errors


async def test_request_over_the_context_limit_is_refused(tiny_checkpoints):
    engine = Engine(engine_config(tiny_checkpoints["instruct"], max_model_len=64))
    prompt_tokens = engine.prepare(request("Hello", max_tokens=1)).prompt_tokens
    assert prompt_tokens < 64

    with pytest.raises(ContextLengthError) as error:
        await collect(engine, request("Hello", max_tokens=100))
    assert "64" in error.value.message
    assert error.value.param == "max_tokens"
    assert engine.running == 0, "nothing may be generated for a refused request"

    with pytest.raises(ContextLengthError):
        await collect(engine, request("Hello", max_tokens=64 - prompt_tokens + 1))
    fits = await collect(engine, request("Hello", max_tokens=64 - prompt_tokens, min_tokens=64 - prompt_tokens))
    assert fits[-1].usage.total_tokens == 64


async def test_checkpoint_without_image_token_ids_is_repaired(tiny_checkpoints, tmp_path, red_image):
    from transformers import AutoConfig

    copy = tmp_path / "no-token-ids"
    shutil.copytree(tiny_checkpoints["instruct"], copy)
    config_path = copy / "config.json"
    config = json.loads(config_path.read_text())
    del config["image_token_id"], config["video_token_id"]
    config_path.write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(copy).image_token_id is None, "the copy must really lack the ids"

    engine = Engine(engine_config(copy))
    assert engine.model.config.image_token_id == engine.processor.image_token_id is not None
    assert engine.model.config.video_token_id == engine.processor.video_token_id is not None

    chunks = await collect(engine, request(red_image, "What is this?", max_tokens=6, min_tokens=6))
    assert chunks[-1].usage.completion_tokens == 6
    assert content(chunks)


def test_missing_checkpoint_directory_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="does not exist") as error:
        Engine(EagerConfig(variant="instruct", checkpoint=str(missing)))
    assert str(missing) in str(error.value)


def test_unknown_preset_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="Unknown preset 'nope'") as error:
        Engine(EagerConfig(variant="instruct", checkpoint="preset:nope"))
    assert "tiny" in str(error.value), "the message should list the presets that exist"


async def test_a_request_over_max_generation_s_ends_with_length(tiny_checkpoints):
    engine = Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]),
                                max_generation_s=0.3, torch_threads=1))
    request = GenerationRequest([ChatMessage("user", ["long"])], enable_thinking=False,
                                sampling=SamplingParams(max_tokens=3000, min_tokens=3000))
    started = time.monotonic()
    chunks = [chunk async for chunk in engine.stream(request)]
    assert time.monotonic() - started < 5
    assert chunks[-1].finish_reason == "length" and 0 < chunks[-1].usage.completion_tokens < 3000


async def test_health_check_generates_when_idle_and_passes(tiny_checkpoints):
    engine = Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), torch_threads=1))
    before = engine.core.batch_sizes.copy()
    await engine.check_health()
    assert engine.core.batch_sizes == [*before, 1], "the idle check ran a real one-token generation"
    assert engine.core.stalled_for() < 1.0


async def test_a_batch_that_stops_stepping_fails_the_health_check_and_passes_once_it_moves(tiny_checkpoints):
    """A forward that hangs (as a wedged device would) makes the health check fail, so Serve replaces the replica."""
    engine = Engine(engine_config(tiny_checkpoints["instruct"], health_check_stall_s=0.5))
    gate, calls = threading.Event(), []

    runner = engine.core.runner
    decode = runner.decode

    def wedged(rows: int):
        calls.append(1)
        if len(calls) == 4:
            gate.wait(120)
        return decode(rows)

    runner.decode = wedged
    request = GenerationRequest([ChatMessage("user", ["hi"])], enable_thinking=False,
                                sampling=SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0))

    async def generate() -> list[Chunk]:
        return [chunk async for chunk in engine.stream(request)]

    task = asyncio.create_task(generate())
    try:
        await wait_until_async(lambda: len(calls) >= 4, what="the fourth decode step to start")
        await wait_until_async(lambda: engine.core.stalled_for() > 0.5, what="the stall to pass the limit")
        with pytest.raises(RuntimeError, match="made no progress"):
            await engine.check_health()
    finally:
        gate.set()
    chunks = await task
    runner.decode = decode
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    await engine.check_health()
