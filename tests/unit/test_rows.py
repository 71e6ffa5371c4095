"""A row's token stream: tokens that arrived together come as one item, it ends on eos / max_tokens /
cancellation / deadline, and an error reaches its reader."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.engine.rows import Row, deliver, merge_inputs
from deployments.engine.sampling import RowSampling


def row(max_tokens: int = 10, min_tokens: int = 0, deadline: float | None = None) -> Row:
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    return Row(inputs, RowSampling(min_tokens=min_tokens), max_tokens, {0}, asyncio.get_running_loop(),
               deadline=deadline)


async def read(r: Row) -> list[list[int]]:
    return [ids async for ids in r]


async def test_tokens_delivered_together_arrive_as_one_item():
    r = row()
    for token in (5, 6, 7):
        r.add(token)
    deliver([r])
    r.add(8)
    r.end()
    assert await read(r) == [[5, 6, 7, 8]]


async def test_a_row_ends_at_eos_once_it_has_its_min_tokens():
    r = row(min_tokens=2)
    r.add(0)
    assert not r.finished, "eos before min_tokens does not end the row"
    r.add(0)
    assert r.finished and await read(r) == [[0, 0]]


async def test_a_row_ends_at_max_tokens_or_when_cancelled_or_past_its_deadline():
    capped, cancelled, late = row(max_tokens=2), row(), row(deadline=0.0)
    capped.add(4), capped.add(5)
    cancelled.cancel()
    cancelled.add(4)
    late.add(4)
    assert capped.finished and cancelled.finished and late.finished and late.timed_out
    assert await read(capped) == [[4, 5]]


async def test_an_error_reaches_the_reader_after_the_tokens_before_it():
    r = row()
    r.add(4)
    deliver([r])
    r.end(ValueError("boom"))
    stream = aiter(r)
    assert await anext(stream) == [4]
    with pytest.raises(ValueError, match="boom"):
        await anext(stream)


async def test_rows_are_fed_from_another_thread():
    r = row(max_tokens=3)

    def engine() -> None:
        for token in (4, 5, 6):
            r.add(token)
            deliver([r])

    await asyncio.to_thread(engine)
    assert sum(await read(r), []) == [4, 5, 6]


def test_merge_inputs_left_pads_ids_and_masks_and_leaves_pixels_to_each_request():
    a = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "pixel_values": torch.ones(1, 3, 14, 5)}
    b = {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(1, 3, 14, 7)}
    merged = merge_inputs([a, b], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert merged["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert set(merged) == {"input_ids", "attention_mask"}


async def test_a_stream_interval_gathers_the_tokens_that_arrive_meanwhile():
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    r = Row(inputs, RowSampling(), 100, {0}, asyncio.get_running_loop(), stream_interval_s=0.2)
    released = asyncio.Event()

    async def engine() -> None:
        for token in range(4, 14):
            r.add(token)
            deliver([r])
            if token == 4:
                await released.wait()
            await asyncio.sleep(0.005)
        r.end()

    feeding = asyncio.create_task(engine())
    stream = aiter(r)
    assert await anext(stream) == [4], "the first item goes out at once"
    released.set()
    rest = [ids async for ids in stream]
    await feeding
    assert sum(rest, []) == list(range(5, 14)) and len(rest) < 9, f"later tokens come gathered: {rest}"
