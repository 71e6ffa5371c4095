"""The compiled decode step (`compile_decode`) and the compiled forward of a resumed prompt's suffix
(`compile_resumed_prefill`) on the real tiny checkpoint: torch.compile (inductor) of the model's own
forward on the engine's SlotCache, and on a one-row DynamicCache holding a prefix.

Compiled kernels round differently from eager ones, and random weights give near-tied logits, so
the compiled step is checked against the eager one by its logits (fp32, step by step, the same
tokens fed to both), and the suffix forward by its hidden states, not by greedy text. Every test runs
under the `fail_on_recompile` stance: a call the warm-up graphs do not cover fails the test instead of
silently running eagerly.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.cache_utils import DynamicCache

from deployments.engine import checkpoint
from deployments.engine.compiled import SUFFIX_MAX, CompiledForward, DecodeStep, reference_decode
from deployments.common.config import ModelConfig
from deployments.engine.engine import Engine
from deployments.engine.slots import SlotCache
from deployments.engine.tower import TextTower
from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams
from tests.kinds import EagerConfig
from tests.waiting import wait_until_async

# Inductor compiles C++ on a CPU: without a compiler these tests say so instead of failing deep inside
# torch.compile (`make test` installs Debian's g++ when none is there; `make test-fast` installs nothing).
NO_COMPILER = not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))
pytestmark = [pytest.mark.usefixtures("restore_torch_threads"), pytest.mark.timeout(900),
              pytest.mark.skipif(NO_COMPILER, reason="torch.compile needs a C++ compiler on a CPU: "
                                                     "sudo apt-get install g++ (or run make test, which does)")]

COMPILE_TIMEOUT_S = 600  # two graphs on a busy 2-core machine; about a minute on a quiet one


@pytest.fixture(autouse=True)
def fail_on_recompile(monkeypatch) -> None:
    monkeypatch.setattr(CompiledForward, "fallback", "fail_on_recompile")


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    torch.set_num_threads(1)
    return checkpoint.load(str(tiny_checkpoints["instruct"]), "instruct", "float32", "cpu")[1]


def slot_cache(model, initial_len: int) -> SlotCache:
    with torch.inference_mode():  # as the engine makes its cache
        return SlotCache(model.config.get_text_config(), 4, 4096, model.dtype, model.device, initial_len=initial_len)


def prefill(model, cache: SlotCache, prompts: list[torch.Tensor]) -> None:
    """Each prompt's state into its slot, as the engine's join does."""
    text = model.model.language_model
    for slot, ids in enumerate(prompts):
        prefilled = DynamicCache(config=model.config.get_text_config())
        text(input_ids=ids[None], cache=prefilled, use_cache=True)
        cache.load(slot, prefilled, 0, 0, len(ids))


@pytest.mark.parametrize("forward", ["engine", "transformers"])
def test_the_compiled_step_gives_the_eager_reference_logits_for_every_batch_shape(model, forward):
    """Either decode forward, compiled (the engine's tower frozen, as on a CPU replica), against the eager step of
    transformers' modules."""
    text, lm_head = model.model.language_model, model.lm_head
    reference = reference_decode(text, lm_head)
    if forward == "engine":
        step = DecodeStep(TextTower(text, lm_head), True, lambda: slot_cache(model, 16), freeze=True)
    else:
        step = DecodeStep(reference, True, lambda: slot_cache(model, 16))
    assert step.wait_compiled(COMPILE_TIMEOUT_S), step.error
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (length,), generator=generator) for length in (5, 11, 2)]
    with torch.inference_mode():
        eager, compiled = slot_cache(model, 12), slot_cache(model, 12)  # 12 columns: both grow mid-test
        prefill(model, eager, prompts)
        prefill(model, compiled, prompts)
        ids = torch.stack([p[-1] for p in prompts])
        steps = 0
        # one row; three of unequal lengths; two (a row left); one again; each for several steps
        for rows in (1, 3, 2, 1):
            for _ in range(6):
                positions, mask = eager.begin_step(rows)
                expected = reference(ids[:rows, None], positions, mask, eager)
                positions, mask = compiled.begin_step(rows, masked=rows > 1)
                got = step(ids[:rows, None], positions, mask, compiled)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                eager.end_step()
                compiled.end_step()
                ids[:rows] = expected.argmax(-1)
                steps += 1
        assert compiled.capacity > 12 and torch.equal(compiled.lengths, eager.lengths)
        for store in ("keys", "values", "conv", "recurrent"):
            for layer, tensor in getattr(eager, store).items():
                torch.testing.assert_close(getattr(compiled, store)[layer][:3], tensor[:3], rtol=1e-4, atol=1e-4)
    assert step.compiled_steps == steps


def test_a_step_the_graphs_do_not_cover_runs_eagerly_by_default(model, monkeypatch):
    """The production stance: a call no graph covers (here an input of another dtype) is not compiled
    under the running rows' feet; it runs eagerly and gives the eager logits."""
    monkeypatch.setattr(DecodeStep, "fallback", "eager_on_recompile")
    step = DecodeStep(TextTower(model.model.language_model, model.lm_head), True, lambda: slot_cache(model, 16),
                      freeze=True)
    assert step.wait_compiled(COMPILE_TIMEOUT_S), step.error
    with torch.inference_mode():
        eager, other = slot_cache(model, 16), slot_cache(model, 16)
        prompts = [torch.arange(10, 17)]
        prefill(model, eager, prompts)
        prefill(model, other, prompts)
        ids = torch.tensor([[7]], dtype=torch.int32)  # the engine always feeds int64: no graph has int32 ids
        expected = step._eager(ids.long(), *eager.begin_step(1), eager)
        graphs = counters["stats"]["unique_graphs"]
        got = step(ids, *other.begin_step(1), other)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled for it


def request(text: str, tokens: int, **sampling) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [text])], False,
                             SamplingParams(max_tokens=tokens, min_tokens=tokens, **sampling))


async def count_tokens(engine: Engine, req: GenerationRequest) -> list[int]:
    """Completion tokens of each of the request's sequences."""
    counts = {}
    async for chunk in engine.stream(req):
        if chunk.usage:
            counts[chunk.index] = chunk.usage.completion_tokens
    return [counts[i] for i in sorted(counts)]


async def test_a_compiled_engine_serves_while_compiling_then_runs_every_step_compiled(tiny_checkpoints):
    engine = Engine(ModelConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), torch_threads=1,
                                dtype="float32", max_batch_size=4, compile_decode=True))
    # While the graphs are built, requests decode eagerly.
    assert await count_tokens(engine, request("Hello", 8)) == [8]
    step = engine.core.runner.step
    assert await asyncio.to_thread(step.wait_compiled, COMPILE_TIMEOUT_S), step.error
    eager_steps = engine.core.decode_steps - engine.core.runner.step.compiled_steps
    # Rows join and leave at different lengths, two share a prompt, one grows the cache past its first
    # 256 columns, one samples with a penalty and a seed.
    counts = await asyncio.gather(
        count_tokens(engine, request("Tell me a long story about the sea", 300)),
        count_tokens(engine, request("Hi", 20, n=2, temperature=0.9, seed=3)),
        count_tokens(engine, request("Name three colours " * 6, 60, repetition_penalty=1.3)),
    )
    assert counts == [[300], [20, 20], [60]]
    assert engine.core.decode_steps - eager_steps == engine.core.runner.step.compiled_steps > 300


@pytest.fixture(scope="module")
def suffix_engine(tiny_checkpoints):
    """An engine whose resumed prefills run compiled (its prefix cache on, as by default), graphs built."""
    torch.set_num_threads(1)
    graphs = counters["stats"]["unique_graphs"]
    engine = Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), torch_threads=1,
                                dtype="float32", compile_resumed_prefill=True))
    assert engine.core.runner.suffix.wait_compiled(COMPILE_TIMEOUT_S), engine.core.runner.suffix.error
    # One graph per linear-attention chunk size: traced through the engine's StateTaps, which picks the chunk.
    assert counters["stats"]["unique_graphs"] - graphs == 2
    return engine


def holding(engine: Engine, ids: torch.Tensor) -> DynamicCache:
    """A one-row DynamicCache holding the prefix `ids`, prefilled eagerly (as a snapshot restores one)."""
    cache = DynamicCache(config=engine.core.runner.text_config)
    engine.core.runner.text(input_ids=ids[None], cache=cache, use_cache=True, position_ids=torch.arange(len(ids))[None])
    return cache


def test_the_compiled_suffix_forward_gives_the_eager_hidden_states_for_every_length(suffix_engine):
    """Both graphs (suffixes of 2 to 31, and 33 to 63: each side of the bound), prefixes short and long, and
    the states each forward leaves in the cache: what the row's next forward or decode step reads."""
    core = suffix_engine.core
    embed = suffix_engine.model.model.get_input_embeddings()
    generator = torch.Generator().manual_seed(1)
    graphs, calls = counters["stats"]["unique_graphs"], core.runner.suffix.compiled_calls
    cases = [(3, 2), (17, 23), (40, 31), (9, 33), (130, SUFFIX_MAX), (200, 7)]
    with torch.inference_mode():
        for past, length in cases:
            ids = torch.randint(10, 1000, (past + length,), generator=generator)
            assert core.runner.suffix.covers(1, past, length)
            args = (embed(ids[None, past:]), torch.ones(1, past + length, dtype=torch.long),
                    torch.arange(past, past + length)[None])
            eager, compiled = holding(suffix_engine, ids[:past]), holding(suffix_engine, ids[:past])
            expected = core.runner.suffix._eager(*args, eager)
            got = core.runner.suffix(*args, compiled)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            for layer, (want, have) in enumerate(zip(eager.layers, compiled.layers)):
                for name in ("keys", "values", "conv_states", "recurrent_states"):
                    if hasattr(want, name):
                        torch.testing.assert_close(getattr(have, name), getattr(want, name), rtol=1e-4, atol=1e-4,
                                                   msg=lambda m: f"layer {layer} {name}: {m}")
    assert core.runner.suffix.compiled_calls - calls == len(cases)
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's two graphs served every case
    assert not core.runner.suffix.covers(1, 5, SUFFIX_MAX + 1) and not core.runner.suffix.covers(2, 5, 8)
    assert not core.runner.suffix.covers(1, 5, 32)  # one whole chunk: no graph's guards admit it
    assert not core.runner.suffix.covers(1, 0, 8) and not core.runner.suffix.covers(1, 5, 1)


async def test_a_chats_later_turns_resume_through_the_compiled_suffix_forward(suffix_engine):
    """Turn 1 (long enough to be stored) prefills eagerly from nothing; each answer is carried into the prefix
    cache; turns 2 and 3 resume there and run compiled; a later turn longer than the graphs take runs eagerly.
    Each answers in full."""
    core = suffix_engine.core
    history: list[ChatMessage] = []
    calls = []
    questions = ("Describe the sea " * 80, "Why is it blue", "And at night", "Tell me more " * 20)
    for turn, question in enumerate(questions):
        history.append(ChatMessage("user", [question]))
        req = GenerationRequest(list(history), False, SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0))
        text, counts = "", []
        async for chunk in suffix_engine.stream(req):
            text += chunk.content
            if chunk.usage:
                counts.append(chunk.usage.completion_tokens)
        assert counts == [6]
        calls.append(core.runner.suffix.compiled_calls)
        await wait_until_async(lambda: core.answers_carried == turn + 1, what="the answer carried")
        history.append(ChatMessage("assistant", [text]))
    assert core.prefix_cache.stats[0] == 3, "turns 2-4 resumed from the prefix cache"
    assert calls[1] == calls[0] + 1 and calls[2] == calls[1] + 1  # turns 2 and 3: compiled
    assert calls[3] == calls[2]  # turn 4's suffix (over 63 tokens) ran eagerly
