"""The sampling surface beyond text on the real tiny checkpoint: n sequences from one prefill, logprobs,
stop_token_ids and the vision downsample mode. References are plain `model.generate` / forward runs."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from deployments.engine.engine import Engine
from deployments.common.errors import BadRequestError
from deployments.common.types import ChatMessage, Chunk, GenerationRequest, SamplingParams
from tests.kinds import EXACT_DTYPE, EagerConfig  # n greedy sequences are compared with one exactly
from tests.waiting import wait_until_async


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    return Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), max_batch_size=8,
                              torch_threads=1, dtype=EXACT_DTYPE))


def ask(*content, **sampling) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", list(content) or ["Tell me a story"])], enable_thinking=False,
                             sampling=SamplingParams(**sampling))


async def run(engine: Engine, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(request)]


def texts(chunks: list[Chunk], n: int) -> list[str]:
    return ["".join(c.content for c in chunks if c.index == i) for i in range(n)]


def finals(chunks: list[Chunk]) -> dict[int, Chunk]:
    return {c.index: c for c in chunks if c.finish_reason}


def reference_ids(engine: Engine, request: GenerationRequest, tokens: int) -> list[int]:
    prepared = engine.prepare(request)
    out = engine.model.generate(**prepared.inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, prepared.prompt_tokens:].tolist()


class ForwardCounter:
    """Counts the forwards the engine's model runner runs, prefill chunks and decode steps (observes only)."""

    def __init__(self, engine: Engine) -> None:
        self.calls, self._runner = 0, engine.core.runner

    def __enter__(self) -> ForwardCounter:
        self._originals = self._runner.prefill_chunk, self._runner.decode

        def counted(forward):
            def run(*args):
                self.calls += 1
                return forward(*args)
            return run

        self._runner.prefill_chunk, self._runner.decode = map(counted, self._originals)
        return self

    def __exit__(self, *exc) -> None:
        self._runner.prefill_chunk, self._runner.decode = self._originals


# ---------------------------------------------------------------------------- n


async def test_n_greedy_sequences_share_one_prefill_and_equal_the_single_answer(engine):
    single = await run(engine, ask(max_tokens=10, min_tokens=10, temperature=0.0))
    with ForwardCounter(engine) as forwards:
        three = await run(engine, ask(max_tokens=10, min_tokens=10, temperature=0.0, n=3))

    assert texts(three, 3) == texts(single, 1) * 3
    assert forwards.calls == 10, "one prefill forward and 9 decode steps for all three sequences"
    ends = finals(three)
    assert sorted(ends) == [0, 1, 2]
    assert all(end.usage.completion_tokens == 10 and end.finish_reason == "length" for end in ends.values())


async def test_n_seeded_sequences_differ_from_each_other_and_repeat_exactly(engine):
    sampled = dict(max_tokens=16, min_tokens=16, temperature=1.0, seed=1234)
    first = texts(await run(engine, ask(n=3, **sampled)), 3)
    again = texts(await run(engine, ask(n=3, **sampled)), 3)
    single = texts(await run(engine, ask(**sampled)), 1)

    assert first == again
    assert len(set(first)) == 3, "each sequence draws its own tokens"
    assert first[0] == single[0], "sequence 0 uses the request's seed itself"


async def test_n_above_the_batch_size_is_a_bad_request(engine):
    with pytest.raises(BadRequestError, match="at most 8 sequences"):
        await run(engine, ask(max_tokens=2, n=9))


async def test_cancelling_an_n_request_stops_every_sequence(engine):
    cancelled, steps = engine.core.cancelled_rows, engine.core.decode_steps
    stream = engine.stream(ask(max_tokens=400, min_tokens=400, n=4))
    async for chunk in stream:
        if chunk.content:
            break
    await stream.aclose()
    await wait_until_async(lambda: engine.running == 0, what="every sequence to stop")
    assert engine.core.cancelled_rows - cancelled == 4, "each of the four rows left as cancelled"
    assert engine.core.decode_steps - steps < 200, "they left long before their 400 tokens"


# ---------------------------------------------------------------------------- logprobs


async def test_logprobs_are_the_raw_model_distribution_of_each_greedy_token(engine):
    request = ask(max_tokens=6, min_tokens=6, temperature=0.0, logprobs=3)
    chunks = await run(engine, request)
    entries = [entry for c in chunks for entry in c.logprobs]

    prepared = engine.prepare(request)
    out = engine.model.generate(**prepared.inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, prepared.prompt_tokens:].tolist()
    assert len(entries) == len(ids) == 6
    for entry, token, logits in zip(entries, ids, out.logits):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        assert entry.token == engine.tokenizer.decode([token])
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-3)
        assert len(entry.top) == 3
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob, abs=1e-6)), "greedy picks the top one"
        top_ids = expected.topk(3).indices.tolist()
        assert [t for t, _ in entry.top] == [engine.tokenizer.decode([i]) for i in top_ids]


async def test_logprobs_are_absent_unless_asked_and_cover_every_token_when_asked(engine):
    plain = await run(engine, ask(max_tokens=5, min_tokens=5))
    assert all(c.logprobs is None for c in plain)
    asked = await run(engine, ask(max_tokens=5, min_tokens=5, temperature=1.0, seed=3, logprobs=0, n=2))
    for index in (0, 1):
        entries = [e for c in asked if c.index == index for e in c.logprobs]
        assert len(entries) == 5 and all(e.top == [] and e.logprob <= 0.0 for e in entries)


# ---------------------------------------------------------------------------- stop_token_ids


async def test_stop_token_ids_end_the_sequence_and_add_no_text(engine):
    ids = reference_ids(engine, ask(), 24)
    # A token whose first occurrence is a few tokens in, and which decodes to visible text.
    position, stop_id = next((i, t) for i, t in enumerate(ids) if i >= 3 and t not in ids[:i]
                             and engine.tokenizer.decode([t]).strip())

    chunks = await run(engine, ask(max_tokens=24, min_tokens=0, temperature=0.0, stop_token_ids=[stop_id]))
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == position + 1
    assert texts(chunks, 1)[0] == engine.tokenizer.decode(ids[:position], skip_special_tokens=True)


async def test_stop_token_ids_wait_for_min_tokens(engine):
    ids = reference_ids(engine, ask(), 12)
    chunks = await run(engine, ask(max_tokens=12, min_tokens=12, temperature=0.0, stop_token_ids=[ids[2]]))
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].finish_reason == "length"


async def test_stop_token_ids_outside_the_vocabulary_are_a_bad_request(engine):
    vocab = engine.model.config.get_text_config().vocab_size
    with pytest.raises(BadRequestError, match="outside this model's vocabulary"):
        await run(engine, ask(max_tokens=2, stop_token_ids=[vocab]))


# ---------------------------------------------------------------------------- downsample_mode


async def test_downsample_mode_4x_gives_an_image_about_four_times_the_tokens_and_generates(engine):
    image = Image.new("RGB", (448, 448), (20, 120, 220))
    default = engine.prepare(GenerationRequest([ChatMessage("user", [image, "what"])], enable_thinking=False))
    image_id = engine.model.config.image_token_id
    finer = GenerationRequest([ChatMessage("user", [image, "what"])], enable_thinking=False, downsample_mode="4x",
                              sampling=SamplingParams(max_tokens=4, min_tokens=4))

    default_slots = int((default.inputs["input_ids"] == image_id).sum())
    finer_slots = int((engine.prepare(finer).inputs["input_ids"] == image_id).sum())
    # 4x per slice before rounding: each slice's patch count is divided by 4 instead of 16.
    assert finer_slots >= 3 * default_slots > 0
    chunks = await run(engine, finer)
    assert chunks[-1].usage.completion_tokens == 4
