"""The batch runner's failure handling, driven by a fake `generate` (the real model is in tests/integration)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import Cache

from deployments.batching import DONE, BatchRunner, Slot

TOKEN = 7


def fake_generate(fail_on: str):
    """A `generate` that prefills (one token per row) and raises when asked to `fail_on` 'prefill' or 'decode'."""

    def generate(input_ids, streamer, cache=None, **kwargs):
        streamer.put(input_ids)  # generate hands over the prompt first
        if fail_on == ("decode" if cache is not None else "prefill"):
            raise RuntimeError(f"{fail_on} broke")
        token = torch.full((input_ids.shape[0], 1), TOKEN)
        streamer.put(token)
        return SimpleNamespace(sequences=torch.cat([input_ids, token], dim=1), cache=Cache(layers=[]))

    return generate


def slot(max_tokens: int) -> Slot:
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    return Slot(inputs=inputs, max_tokens=max_tokens, min_tokens=0, processors=LogitsProcessorList(), eos_ids={0},
                loop=asyncio.get_running_loop())


async def became_idle(runner: BatchRunner) -> bool:
    """Whether the runner thread, alive, finished its bookkeeping after the last token was delivered."""
    for _ in range(500):
        if runner.stalled_for() == 0.0:  # no batch running or prefilling; inf if the thread died
            return True
        await asyncio.sleep(0.01)
    return False


async def received(s: Slot) -> list:
    items = []
    while not items or items[-1] is not DONE:
        items.append(await asyncio.wait_for(s.tokens.get(), timeout=5))
    return items


async def test_a_failing_decode_ends_its_rows_with_the_error_and_the_runner_keeps_serving():
    rows_reported = []
    runner = BatchRunner(fake_generate(fail_on="decode"), pad_token_id=0, max_batch_size=4, batch_wait_s=0.0,
                         on_rows=rows_reported.append)
    failing = slot(max_tokens=5)
    runner.submit(failing)
    first, error, done = await received(failing)
    assert first == [TOKEN] and isinstance(error, RuntimeError) and done is DONE
    assert await became_idle(runner)
    assert rows_reported[-1] == 0 and runner.rows_in_batch == 0

    one_token = slot(max_tokens=1)  # prefill only: the fake never decodes it
    runner.submit(one_token)
    assert await received(one_token) == [[TOKEN], DONE]
    assert await became_idle(runner) and runner.running == 0


async def test_a_failing_prefill_ends_the_newcomers_with_the_error():
    runner = BatchRunner(fake_generate(fail_on="prefill"), pad_token_id=0, max_batch_size=4, batch_wait_s=0.0)
    newcomer = slot(max_tokens=3)
    runner.submit(newcomer)
    error, done = await received(newcomer)
    assert isinstance(error, RuntimeError) and done is DONE
    assert runner.running == 0
