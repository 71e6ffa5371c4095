"""The scheduler: requests that fit start past an older one that does not (a bounded number of times), and a
waiting request honours its deadline."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from deployments.common.errors import OverloadedError
from deployments.engine.reuse import PrefixCache
from deployments.engine.rows import Row
from deployments.engine.sampling import RowSampling
from deployments.engine.scheduler import Scheduler

MAX_ROWS = 4


def family(n: int = 1, deadline: float | None = None, prompt: int = 3) -> list[Row]:
    inputs = {"input_ids": torch.ones(1, prompt, dtype=torch.long), "attention_mask": torch.ones(1, prompt)}
    return [Row(inputs, RowSampling(), 8, {0}, asyncio.get_running_loop(), deadline=deadline) for _ in range(n)]


def scheduler(prefill_tokens: int = 512) -> Scheduler:
    return Scheduler(MAX_ROWS, prefill_tokens, batch_wait_s=0.0, continuous=True, prefix_cache=PrefixCache(0))


def queue(s: Scheduler, *families: list[Row]) -> None:
    for f in families:
        s.submit(f)
    s.admit(busy=True)


async def test_a_request_that_fits_starts_past_an_older_one_that_does_not():
    s = scheduler()
    wide, small = family(MAX_ROWS), family(1)
    queue(s, wide, small)
    group, past = s.next_group(free=2)  # two rows run: the n=4 request cannot start
    assert group == [small] and past is None and s.passed_over == 1
    assert s.next_group(free=1) is None, "the wide one still waits, alone"
    assert s.next_group(free=MAX_ROWS) == ([wide], None), "and starts once the batch has room"


async def test_requests_behind_a_waiting_one_group_with_each_other_not_with_it():
    s = scheduler()
    wide, a, b = family(3), family(1), family(1)
    queue(s, wide, a, b)
    assert s.next_group(free=2) == ([a, b], None)


async def test_after_max_rows_requests_passed_it_nothing_passes_an_older_request():
    s = scheduler(prefill_tokens=3)  # one prompt per group: each passing request counts once
    wide = family(MAX_ROWS)
    queue(s, wide, *[family(1) for _ in range(MAX_ROWS + 2)])
    started = 0
    while s.next_group(free=1) is not None:
        started += 1
    assert started == MAX_ROWS, "it was passed max_rows times, then nothing more started past it"
    assert s.next_group(free=MAX_ROWS) == ([wide], None), "it goes first once there is room"
    assert s.next_group(free=1) is not None, "then the others go on"


async def test_a_waiting_request_past_its_deadline_ends_with_a_503_before_it_starts():
    s = scheduler()
    late, fresh = family(2, deadline=time.monotonic() - 1), family(1, deadline=time.monotonic() + 60)
    queue(s, late, fresh)
    for row in late:
        assert row.finished and row.timed_out
        with pytest.raises(OverloadedError, match="max_generation_s"):
            [ids async for ids in row]
    assert s.expired == 1 and s.queued == fresh
    assert s.next_group(free=MAX_ROWS) == ([fresh], None)


async def test_a_request_cancelled_while_waiting_leaves_the_queue_without_an_error():
    s = scheduler()
    gone = family(1)
    queue(s, gone)
    gone[0].cancel()
    assert s.next_group(free=MAX_ROWS) is None and gone[0].finished and not gone[0].timed_out
    assert [ids async for ids in gone[0]] == [] and s.expired == 0
