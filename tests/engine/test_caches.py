"""The prefix and vision-feature caches on the real tiny checkpoints: what they skip, and that greedy
output is exactly what an engine without them generates."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from deployments.engine import reuse
from deployments.common.digest import stamp_video
from deployments.engine.engine import Engine
from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams, Video
from tests.kinds import EXACT_DTYPE, EagerConfig  # greedy output with caches must equal output without
from tests.waiting import wait_until_async


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def engine(checkpoints, variant: str = "instruct", **settings) -> Engine:
    return Engine(EagerConfig(variant=variant, checkpoint=str(checkpoints[variant]), torch_threads=1,
                              **{"dtype": EXACT_DTYPE, **settings}))


@pytest.fixture(scope="module")
def cold(tiny_checkpoints) -> dict[str, Engine]:
    """Engines with both caches off: the reference."""
    return {v: engine(tiny_checkpoints, v, prefix_cache_bytes=0, vision_cache_bytes=0) for v in ("instruct", "thinking")}


def picture(seed: int, size=(400, 300)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def clip(seed: int, frames: int = 4) -> Video:
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8)
    return Video(pixels, 10.0, frames / 10, list(range(frames)), frames)


def chat(first: list, turns: int, thinking: bool = False, max_tokens: int = 12, **sampling) -> GenerationRequest:
    """A conversation of `turns` user turns that keeps `first` (media and text) in its first turn."""
    messages = [ChatMessage("user", first)]
    for i in range(turns - 1):
        messages += [ChatMessage("assistant", [f"answer number {i} " * 4]), ChatMessage("user", [f"and then {i}?"])]
    return GenerationRequest(messages, enable_thinking=thinking,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling))


async def generate(engine: Engine, request: GenerationRequest) -> tuple[list[int], str]:
    """The generated ids (through the row) and the text."""
    text = []
    async for chunk in engine.stream(request):
        text.append((chunk.reasoning or "") + (chunk.content or ""))
    return text, "".join(text)


class Forwards:
    """Counts the prompt positions the text tower prefills and the vision tower calls of an engine."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.prefilled, self.vision_units = [], 0
        text, inner = engine.core.runner.text, engine.model.model

        def counting_text(*args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None:
                self.prefilled.append(embeds.shape[0] * embeds.shape[1])
            return text(*args, **kwargs)

        def counting(tower):
            def wrapped(pixels, sizes, **kwargs):
                self.vision_units += int(sizes.shape[0])
                return tower(pixels, sizes, **kwargs)
            return wrapped

        monkeypatch.setattr(engine.core.runner, "text", counting_text)
        monkeypatch.setattr(inner, "get_image_features", counting(inner.get_image_features))
        monkeypatch.setattr(inner, "get_video_features", counting(inner.get_video_features))


@pytest.mark.parametrize("variant", ["instruct", "thinking"])
async def test_later_turns_resume_from_the_prefix_and_answer_exactly_as_without_caches(tiny_checkpoints, cold,
                                                                                     variant, monkeypatch):
    """Without carried answers, the first turn (it has the image) is stored, from inside its one forward; each
    later turn, short as it is, resumes from the turn before it and is stored too (its chat came back)."""
    warm = engine(tiny_checkpoints, variant, prefix_cache_answers=False)
    forwards = Forwards(warm, monkeypatch)
    first = [picture(1), "what is in this picture?"]
    stored_at = None
    for stored, turns in enumerate((1, 2, 3, 5), start=1):
        request = chat(first, turns, thinking=variant == "thinking")
        forwards.prefilled.clear()
        hits_before = warm.core.prefix_cache.stats[0]
        got, expected = await generate(warm, request), await generate(cold[variant], request)
        assert got[1] == expected[1], f"turn {turns}: the caches changed the greedy answer"
        prepared = warm.prepare(request)
        if stored_at is None:
            assert sum(forwards.prefilled) == prepared.prompt_tokens and forwards.vision_units > 0
        else:
            assert warm.core.prefix_cache.stats[0] == hits_before + 1
            assert forwards.prefilled == [prepared.prompt_tokens - stored_at], "one forward, from the last turn's end"
        assert len(forwards.prefilled) == 1 and len(warm.core.prefix_cache._lru) == stored
        stored_at = prepared.layout.store_at[0]
    assert forwards.vision_units == 3, "the image's units went through the vision tower once, in turn 1"


def assert_is_state_after(engine: Engine, ids: torch.Tensor, stored: reuse.Snapshot) -> None:
    """`stored` equals the text tower's state after a forward of exactly `ids` (text only) from nothing."""
    with torch.inference_mode():
        reference = DynamicCache(config=engine.core.runner.text_config)
        engine.core.runner.text(input_ids=ids, cache=reference, use_cache=True)
    assert stored is not None and stored.length == ids.shape[1]
    for i, layer in enumerate(reference.layers):
        if hasattr(layer, "conv_states"):
            torch.testing.assert_close(stored.conv[i], layer.conv_states[0][0])
            torch.testing.assert_close(stored.recurrent[i], layer.recurrent_states[0][0])
        else:
            torch.testing.assert_close(stored.keys[i], layer.keys[0])
            torch.testing.assert_close(stored.values[i], layer.values[0])


@pytest.mark.parametrize("variant", ["instruct", "thinking"])
async def test_a_carried_answer_leaves_the_next_turn_only_its_own_text_to_prefill(tiny_checkpoints, cold, variant,
                                                                                   monkeypatch):
    """After each turn, the engine prefills the answer as the next turn resends it, from the chat's last
    snapshot, and stores the state after the next user turn's opening; the next turn resumes there, prefills
    only its own text, and answers as without caches."""
    warm = engine(tiny_checkpoints, variant)
    forwards = Forwards(warm, monkeypatch)
    messages = [ChatMessage("user", [picture(8), "what is in this picture?"])]
    stored_at = None
    for turn in range(3):
        request = GenerationRequest(list(messages), variant == "thinking", SamplingParams(max_tokens=12, temperature=0.0))
        forwards.prefilled.clear()
        answer = "".join([chunk.content async for chunk in warm.stream(request)])
        assert answer == "".join([chunk.content async for chunk in cold[variant].stream(request)])
        prompt = warm.prepare(request)
        if stored_at is None:
            stored_at = prompt.layout.store_at[0]  # the image's turn: stored at its end
        else:
            assert forwards.prefilled[0] == prompt.prompt_tokens - stored_at, "only this turn's own text"
        await wait_until_async(lambda: warm.core.answers_carried == turn + 1, what="the answer carried")
        messages += [ChatMessage("assistant", [answer]), ChatMessage("user", [f"and then {turn}?"])]
        following = warm.prepare(GenerationRequest(list(messages), variant == "thinking"))
        follow = following.layout
        assert forwards.prefilled[-1] == follow.boundaries[-2][0] - stored_at, "the carry prefilled what came since"
        stored_at = follow.boundaries[-2][0]
        carried = warm.tokenizer.decode(following.inputs["input_ids"][0, :stored_at])
        assert carried.endswith(f"{answer}<|im_end|>\n<|im_start|>user\n"), "through the next user turn's opening"
        assert follow.boundaries[-2][1] in warm.core.prefix_cache
    assert forwards.vision_units == 3, "the image went through the vision tower once"


async def test_a_carried_answer_is_the_state_after_exactly_the_chat_so_far(tiny_checkpoints):
    warm = engine(tiny_checkpoints, prefix_cache_min_tokens=1)
    request = chat(["tell me something"], 2)
    answer = "".join([chunk.content async for chunk in warm.stream(request)])
    await wait_until_async(lambda: warm.core.answers_carried == 1, what="the answer carried")
    follow = GenerationRequest([*request.messages, ChatMessage("assistant", [answer]), ChatMessage("user", ["next"])],
                               False)
    prepared = warm.prepare(follow)
    end, key = prepared.layout.boundaries[-2]
    assert_is_state_after(warm, prepared.inputs["input_ids"][:, :end], warm.core.prefix_cache._lru.get(key, count=False))


async def test_an_answer_is_carried_only_once_no_row_is_generating(tiny_checkpoints, monkeypatch):
    warm = engine(tiny_checkpoints)
    rows_at_carry = []
    carry = warm.core._carry
    monkeypatch.setattr(warm.core, "_carry", lambda job: (rows_at_carry.append(len(warm.core._rows)), carry(job)))
    long = chat(["write a long story"], 1, max_tokens=60, min_tokens=60)
    image_chat = chat([picture(10), "what is this?"], 1, max_tokens=2)
    long_stream = asyncio.ensure_future(generate(warm, long))
    await wait_until_async(lambda: warm.core.rows_in_batch == 1, what="the long generation running")
    await generate(warm, image_chat)
    assert not long_stream.done(), "precondition: the chat's turn ended while the long generation runs"
    await long_stream
    await wait_until_async(lambda: warm.core.answers_carried == 1, what="the answer carried")
    assert rows_at_carry == [0]


async def test_no_answer_is_carried_for_a_one_shot_prompt_several_sequences_tools_or_when_off(tiny_checkpoints):
    warm, off = engine(tiny_checkpoints), engine(tiny_checkpoints, prefix_cache_answers=False)
    image_chat = chat([picture(9), "what is this?"], 1)
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}
    for request in (chat(["hi"], 1), dataclasses.replace(image_chat, sampling=SamplingParams(max_tokens=4, n=2)),
                    dataclasses.replace(image_chat, tools=[tool])):
        await generate(warm, request)
    await generate(off, image_chat)
    _, answer = await generate(warm, image_chat)  # one that is carried, after all the others
    follow = GenerationRequest([*image_chat.messages, ChatMessage("assistant", [answer]), ChatMessage("user", [""])],
                               False)
    carried_key = warm.prepare(follow).layout.boundaries[-2][1]
    await wait_until_async(lambda: carried_key in warm.core.prefix_cache, what="the last answer carried")
    assert warm.core.answers_carried == 1, "only the last request's answer was carried"
    assert off.core.answers_carried == 0 and len(off.core.prefix_cache._lru) == 1


async def test_with_a_low_threshold_a_short_text_chat_is_stored_from_its_first_turn(tiny_checkpoints, cold,
                                                                                    monkeypatch):
    warm = engine(tiny_checkpoints, prefix_cache_min_tokens=1, prefix_cache_answers=False)
    forwards = Forwards(warm, monkeypatch)
    previous = None
    for turns in (1, 2, 3, 4):
        request = chat(["what is this?"], turns)
        forwards.prefilled.clear()
        assert (await generate(warm, request))[1] == (await generate(cold["instruct"], request))[1]
        if previous is not None:
            resumed_at = warm.prepare(previous).layout.store_at[0]
            assert sum(forwards.prefilled) == warm.prepare(request).prompt_tokens - resumed_at
            assert len(forwards.prefilled) == 1, "resumed, and stored this turn from inside the same forward"
        previous = request
    assert warm.core.prefix_cache.stats == (3, 1) and len(warm.core.prefix_cache._lru) == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_states_tapped_inside_one_forward_are_those_of_forwards_ending_there(tiny_checkpoints, dtype):
    """The linear-attention states StateTaps copies at columns 5 and 9 of one 14-position forward (two rows,
    one left-padded) match the cache after forwards that end at 5 and 9; so do the outputs and final states.
    Within torch's default tolerance for the dtype: bf16's allows its rounding (the whole chunk's projections
    run as one matrix product, the split forwards' as three, and bf16 kernels round by shape)."""
    core = engine(tiny_checkpoints, dtype=dtype).core
    close = torch.testing.assert_close  # its default tolerances follow the dtype
    hidden = core.runner.text_config.hidden_size
    embeds = torch.randn(2, 14, hidden, generator=torch.Generator().manual_seed(0)).to(core.runner.model.dtype)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def forward(cache, start, end):
        return core.runner.text(inputs_embeds=embeds[:, start:end], attention_mask=mask[:, :end],
                         position_ids=positions[:, start:end], cache=cache, use_cache=True).last_hidden_state

    def linear_states(cache, row):
        return {i: (layer.conv_states[0][row].clone(), layer.recurrent_states[0][row].clone())
                for i, layer in enumerate(cache.layers) if hasattr(layer, "conv_states")}

    with torch.inference_mode():
        tapped_cache = DynamicCache(config=core.runner.text_config)
        with core.runner.taps.at({5: [0, 1], 9: [1]}) as tapped:
            whole = forward(tapped_cache, 0, 14)
        split_cache, parts, expected = DynamicCache(config=core.runner.text_config), [], {}
        for start, end in ((0, 5), (5, 9), (9, 14)):
            parts.append(forward(split_cache, start, end))
            expected |= {(end, row): linear_states(split_cache, row) for row in (0, 1) if end < 14}
    assert set(tapped) == {(5, 0), (5, 1), (9, 1)}
    assert len(tapped[(5, 0)]) == sum(hasattr(layer, "conv_states") for layer in tapped_cache.layers) > 0
    for key, layers in tapped.items():
        for i, (conv, recurrent) in layers.items():
            close(conv, expected[key][i][0])
            close(recurrent, expected[key][i][1])
    close(whole, torch.cat(parts, dim=1))
    for row in (0, 1):
        for i, (conv, recurrent) in linear_states(tapped_cache, row).items():
            close(conv, linear_states(split_cache, row)[i][0])
            close(recurrent, linear_states(split_cache, row)[i][1])


async def test_a_stored_snapshot_is_the_state_after_exactly_its_prefix(tiny_checkpoints):
    """Two chats of different lengths prefilled together (left padding) store each its last user turn's end,
    from inside its forward: each entry equals the state of a forward of that prefix alone."""
    warm = engine(tiny_checkpoints, prefix_cache_min_tokens=1, batch_wait_ms=300)
    requests = [chat(["short one"], 2), chat(["a longer opening " * 6], 3)]
    await asyncio.gather(*(generate(warm, request) for request in requests))
    assert warm.core.batch_sizes[0] == 2, "precondition: one prefill group"
    for request in requests:
        prepared = warm.prepare(request)
        length, key = prepared.layout.store_at
        assert_is_state_after(warm, prepared.inputs["input_ids"][:, :length],
                              warm.core.prefix_cache._lru.get(key, count=False))


async def test_a_resent_image_in_a_new_chat_skips_the_vision_tower(tiny_checkpoints, cold, monkeypatch):
    warm = engine(tiny_checkpoints)
    forwards = Forwards(warm, monkeypatch)
    image = picture(2)
    await generate(warm, chat([image, "describe it"], 1))
    units = forwards.vision_units
    other = chat(["a different opening", image, "what now?"], 1)  # no shared prefix: only the features repeat
    assert (await generate(warm, other))[1] == (await generate(cold["instruct"], other))[1]
    assert forwards.vision_units == units, "the features came from the vision cache"
    assert warm.core.vision_cache.stats == (1, 1)


async def test_two_pictures_with_the_same_text_never_share_an_entry(tiny_checkpoints, cold):
    warm = engine(tiny_checkpoints)
    a, b = chat([picture(3), "what is it?"], 2), chat([picture(4), "what is it?"], 2)
    expected_a, expected_b = (await generate(cold["instruct"], a))[1], (await generate(cold["instruct"], b))[1]
    assert expected_a != expected_b, "precondition: the two pictures give different answers"
    await generate(warm, chat([picture(3), "what is it?"], 1))
    assert (await generate(warm, a))[1] == expected_a
    assert (await generate(warm, b))[1] == expected_b, "b must not resume from a's prefix"


async def test_a_video_chat_resumes_too(tiny_checkpoints, cold):
    warm = engine(tiny_checkpoints)
    first = [clip(5), "what happens?"]
    for turns in (1, 2, 4):
        request = chat(first, turns)
        assert (await generate(warm, request))[1] == (await generate(cold["instruct"], request))[1]
    assert warm.core.prefix_cache.stats == (2, 1)


async def test_requests_arriving_together_some_resuming_answer_as_alone(tiny_checkpoints, cold):
    warm = engine(tiny_checkpoints)
    firsts = [[picture(10 + i), f"picture {i}"] for i in range(3)]
    for first in firsts[:2]:
        await generate(warm, chat(first, 1))
    requests = [chat(first, 2) for first in firsts] + [chat(["plain text only"], 1), chat(firsts[0], 3)]
    got = await asyncio.gather(*(generate(warm, request) for request in requests))
    for request, (_, text) in zip(requests, got):
        assert text == (await generate(cold["instruct"], request))[1]
    assert warm.core.prefix_cache.stats[0] >= 2, "the two chats seen before resumed"


async def test_the_caches_stay_within_their_budgets(tiny_checkpoints):
    warm = engine(tiny_checkpoints, prefix_cache_bytes=120_000, vision_cache_bytes=8_000)
    for i in range(8):
        await generate(warm, chat([picture(20 + i), f"chat {i}"], 2, max_tokens=2))
    prefix, vision = warm.core.prefix_cache, warm.core.vision_cache
    assert 0 < prefix.bytes <= 120_000 and 0 < vision.bytes <= 8_000
    assert len(prefix._lru) < 8 and len(vision._lru) < 8, "older entries were evicted"


async def test_downsample_modes_do_not_share_features_or_prefixes(tiny_checkpoints, cold):
    warm = engine(tiny_checkpoints)
    image = picture(30)
    for mode, question in (("16x", "what?"), ("4x", "what?"), ("16x", "anything else?")):
        request = chat([image, question], 2)
        request.downsample_mode = mode
        assert (await generate(warm, request))[1] == (await generate(cold["instruct"], request))[1]
    assert warm.core.prefix_cache.stats == (0, 3), "the 4x chat did not resume from the 16x one"
    assert warm.core.vision_cache.stats == (1, 2), "each mode computed once; the third request reused 16x"


async def test_a_short_text_chat_is_not_stored_and_a_long_one_is(tiny_checkpoints, cold, monkeypatch):
    warm = engine(tiny_checkpoints, prefix_cache_min_tokens=64, prefix_cache_answers=False)
    forwards = Forwards(warm, monkeypatch)
    short = chat(["hi"], 1)
    await generate(warm, short)
    assert len(forwards.prefilled) == 1 and len(warm.core.prefix_cache._lru) == 0, "nothing stored"
    long_opening = ["tell me about this: " + "words and more words " * 20]
    assert warm.prepare(chat(long_opening, 1)).layout.store_at[0] >= 64, "precondition: past the threshold"
    for turns in (1, 2):
        request = chat(long_opening, turns)
        assert (await generate(warm, request))[1] == (await generate(cold["instruct"], request))[1]
    assert warm.core.prefix_cache.stats[0] == 1, "the long chat's second turn resumed"
    assert len(warm.core.prefix_cache._lru) == 2, "and, its chat having come back, was stored too"


async def test_the_image_processor_runs_once_per_image_and_its_merged_output_is_the_processors(tiny_checkpoints):
    warm, plain = engine(tiny_checkpoints), engine(tiny_checkpoints, processor_cache_bytes=0)
    images = [picture(40, (400, 300)), picture(41, (90, 200)), picture(42, (640, 160))]
    request = GenerationRequest([ChatMessage("user", [images[0], "one", images[1]]),
                                 ChatMessage("assistant", ["ok"]), ChatMessage("user", [images[2], "three?"])],
                                enable_thinking=False)
    for attempt in range(2):
        cached, reference = warm._render(request), plain._render(request)
        assert set(cached) == set(reference)
        for name in reference:
            assert torch.equal(cached[name], reference[name]), name
    assert warm.processor_cache.stats == (3, 3), "each image processed once, then reused"


async def test_the_processor_cache_counts_the_requests_lookups_not_the_carried_answers_renders(tiny_checkpoints):
    """Carrying an answer renders the chat again (a processor-cache hit for its image), but only the requests'
    own lookups count, so the dashboard's hit rate is the requests'."""
    warm = engine(tiny_checkpoints)
    messages = [ChatMessage("user", [picture(43), "what is it?"])]
    for turn in range(2):
        request = GenerationRequest(list(messages), False, SamplingParams(max_tokens=4, temperature=0.0))
        answer = "".join([chunk.content async for chunk in warm.stream(request)])
        await wait_until_async(lambda: warm.core.answers_carried == turn + 1, what="the answer carried")
        messages += [ChatMessage("assistant", [answer]), ChatMessage("user", ["and?"])]
    assert warm.processor_cache.stats == (1, 1), "turn 1 missed, turn 2 hit; the two carries are not counted"


async def test_the_video_processor_runs_once_per_video_and_its_merged_output_is_the_processors(
        tiny_checkpoints, monkeypatch):
    warm, plain = engine(tiny_checkpoints), engine(tiny_checkpoints, processor_cache_bytes=0)
    assert plain.processor.video_processor is not warm.processor.video_processor
    long_clip = Video(np.random.default_rng(50).integers(0, 256, (6, 80, 120, 3), dtype=np.uint8),
                      5.0, 1.2, list(range(6)), 6)
    videos = [stamp_video(clip(51)), stamp_video(long_clip)]
    request = GenerationRequest([ChatMessage("user", [videos[0], "one", picture(52)]),
                                 ChatMessage("assistant", ["ok"]), ChatMessage("user", [videos[1], "two?"])],
                                enable_thinking=False)
    hashed = []
    monkeypatch.setattr(reuse, "frames_digest", lambda frames: hashed.append(frames) or b"")
    for attempt in range(2):
        cached, reference = warm._render(request), plain._render(request)
        assert "pixel_values_videos" in reference and set(cached) == set(reference)
        for name in reference:
            assert torch.equal(cached[name], reference[name]), name
    hits, misses = warm.processor_cache.stats
    assert (hits, misses) == (3, 3), "2 videos and 1 image processed once each, then reused"
    assert hashed == [], "the router's digests key the videos: their frames are not hashed again"

    # The same frames with other sampling metadata are another entry, and unstamped frames are hashed.
    other = Video(videos[0].frames, 20.0, 0.2, [0, 2, 4, 6], 8)
    monkeypatch.undo()
    warm._render(GenerationRequest([ChatMessage("user", [other, "again"])], enable_thinking=False))
    assert warm.processor_cache.stats == (3, 4)
