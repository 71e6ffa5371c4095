"""The engine core's failure handling, driven by a fake text tower (the real model is in tests/engine):
a failing decode forward ends the rows it ran, a failure while joining ends only the newcomers, and the
loop keeps serving either way."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3_5TextConfig

from deployments.engine.core import EngineCore
from deployments.engine.reuse import PrefixCache, VisionCache
from deployments.engine.runner import TransformersRunner
from deployments.engine.rows import Row
from deployments.engine.sampling import RowSampling

HIDDEN, VOCAB = 4, 16
CONFIG = Qwen3_5TextConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                           head_dim=HIDDEN, layer_types=["full_attention"], vocab_size=VOCAB)


class FakeText:
    """Writes zero keys/values into whichever cache it gets and returns the embeddings as hidden states."""

    layers: list = []  # no linear-attention layers for the engine's state taps

    def __init__(self) -> None:
        self.fail_decode = False

    def __call__(self, input_ids=None, inputs_embeds=None, cache=None, **kwargs):
        if input_ids is not None:
            if self.fail_decode:
                raise RuntimeError("decode broke")
            inputs_embeds = torch.ones(*input_ids.shape, HIDDEN)
        rows, length = inputs_embeds.shape[:2]
        kv = torch.zeros(rows, 1, length, HIDDEN)
        cache.update(kv, kv, 0)
        return SimpleNamespace(last_hidden_state=inputs_embeds)


class FakeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB)
        embeddings = torch.nn.Embedding(VOCAB, HIDDEN)
        self.model = SimpleNamespace(language_model=FakeText(), get_input_embeddings=lambda: embeddings,
                                     get_image_features=None, get_video_features=None)  # text only
        self.config = SimpleNamespace(get_text_config=lambda: CONFIG, image_token_id=None, video_token_id=None)

    device = torch.device("cpu")
    dtype = torch.float32


def row(tokens: int) -> Row:
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    return Row(inputs, RowSampling(min_tokens=tokens), tokens, {0}, asyncio.get_running_loop())


async def read(r: Row) -> list[int]:
    return sum([ids async for ids in r], [])


@pytest.fixture
def core() -> EngineCore:
    runner = TransformersRunner(FakeModel(), max_rows=4, max_len=512, pad_token_id=0, prefill_tokens=512,
                                prefix_cache=PrefixCache(0), vision_cache=VisionCache(0), decode_path="transformers")
    return EngineCore(runner, max_rows=4, batch_wait_s=0.0)


async def test_a_failing_decode_ends_its_rows_with_the_error_and_the_core_keeps_serving(core):
    core.runner.model.model.language_model.fail_decode = True
    failing = row(5)
    core.submit([failing])
    with pytest.raises(RuntimeError, match="decode broke"):
        await read(failing)
    core.runner.model.model.language_model.fail_decode = False
    again = row(5)
    core.submit([again])
    assert len(await read(again)) == 5 and core.running == 0


async def test_a_failure_while_joining_ends_only_the_newcomers(core, monkeypatch):
    steady = row(200)
    core.submit([steady])
    stream = aiter(steady)
    before = await anext(stream)  # steady is decoding

    def broken_load(*args, **kwargs):
        raise ValueError("no slot")

    monkeypatch.setattr(core.runner.cache, "load", broken_load)
    newcomer = row(5)
    core.submit([newcomer])
    with pytest.raises(ValueError, match="no slot"):
        await read(newcomer)
    monkeypatch.undo()
    rest = sum([ids async for ids in stream], [])
    assert len(before) + len(rest) == 200, "the running row went on to its end"
