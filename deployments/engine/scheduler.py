"""The engine's scheduler: which waiting requests are prefilled next, and when.

Requests arrive from the replica's event loop (`submit`, thread-safe) and wait in arrival order.
Each loop iteration the core asks the scheduler for the next prefill group (`next_group`): the
oldest request whose rows fit the free slots, with the requests right behind it whose padded
prompts fit the prefill budget beside it. A request that does not fit now (an `n` request wider
than the free slots) does not hold up the ones behind it: they start past it, but at most
`max_rows` of them, after which nothing passes it and the batch drains until it fits (so it is
never starved). A waiting request honours `max_generation_s` like a running one: one whose deadline
passes before it was prefilled ends with a 503 (`OverloadedError`), not after the wait.

When the engine is idle, `admit` blocks for the next request and gathers what else arrives within
`batch_wait_s` (not for a request that resumes from the prefix cache: it is prefilled alone).
"""

from __future__ import annotations

import queue
import time
from collections import deque

from deployments.common.errors import OverloadedError
from deployments.engine.prefill import AnswerJob, Family
from deployments.engine.reuse import PrefixCache, Snapshot
from deployments.engine.rows import Row


class Scheduler:
    """Waiting requests in arrival order, and the answers to carry into the prefix cache when idle."""

    def __init__(self, max_rows: int, prefill_tokens: int, batch_wait_s: float, continuous: bool,
                 prefix_cache: PrefixCache) -> None:
        self.max_rows, self.prefill_tokens, self.continuous = max_rows, prefill_tokens, continuous
        self._wait_s, self.prefix_cache = batch_wait_s, prefix_cache
        self._waiting: queue.Queue[Family | AnswerJob] = queue.Queue()  # from the event loop
        self._queued: deque[Family] = deque()  # admitted by the engine thread, not yet prefilled
        self._answers: deque[AnswerJob] = deque(maxlen=max_rows)  # the oldest are dropped when full
        self._passed: dict[int, int] = {}  # id(family) -> how many requests started past it
        self.passed_over = 0  # requests started past an older one that did not fit, in all
        self.expired = 0  # requests whose deadline passed while they waited, in all

    # ---- called from the event loop ----

    def submit(self, family: Family) -> None:
        self._waiting.put(family)

    def carry_answer(self, job: AnswerJob) -> None:
        self._waiting.put(job)

    @property
    def waiting_rows(self) -> int:
        """Rows submitted that the engine thread has not admitted yet."""
        with self._waiting.mutex:
            return sum(len(family) for family in self._waiting.queue if isinstance(family, list))

    # ---- the engine thread ----

    @property
    def queued(self) -> list[Row]:
        """The rows admitted and not prefilled yet."""
        return [row for family in list(self._queued) for row in family]

    @property
    def has_queued(self) -> bool:
        return bool(self._queued)

    @property
    def has_answers(self) -> bool:
        return bool(self._answers)

    def admit(self, busy: bool) -> None:
        """Move waiting requests to the queue (and answers to theirs): when idle (`busy` false), block for one
        and wait `batch_wait_s` for more (unless it resumes from the prefix cache); while busy, whatever waits
        (nothing in static batching). Cancelled requests and those past their deadline leave here."""
        busy = busy or bool(self._queued or self._answers)
        if not busy or self.continuous:
            taken = [] if busy else [self._waiting.get()]
            # A request that resumes from the prefix cache is prefilled alone: waiting for company only delays it.
            alone = bool(taken) and isinstance(taken[0], list) and self.resume_point(taken[0]) is not None
            deadline = time.monotonic() + (0.0 if busy or alone else self._wait_s)
            while True:
                try:
                    taken.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._queued.extend(family for family in taken if isinstance(family, list))
            self._answers.extend(job for job in taken if isinstance(job, AnswerJob))
        self._drop_leaving()

    def next_group(self, free: int) -> tuple[list[Family], Snapshot | None] | None:
        """The next prefill group for `free` slots and the prefix snapshot it resumes from (a group of one
        then), taken off the queue; None when no waiting request may start now."""
        self._drop_leaving()
        start = self._first_startable(free)
        if start is None:
            return None
        for family in list(self._queued)[:start]:  # older requests this one starts past
            self._passed[id(family)] = self._passed.get(id(family), 0) + 1
        self.passed_over += bool(start)
        group = [self._take(start)]
        past = self.resume_point(group[0])
        while past is None and start < len(self._queued) and self._groups_with(group, self._queued[start], free):
            group.append(self._take(start))
        return group, past

    def next_answer(self) -> AnswerJob | None:
        return self._answers.popleft() if self._answers else None

    def retry_alone(self, group: list[Family]) -> None:
        """Put a failed group's requests back at the front, each to be prefilled on its own."""
        for family in reversed(group):
            family[0].alone = True
            self._queued.appendleft(family)

    def drain(self) -> list[Row]:
        """Take every queued row off the queue (the loop failed outside its guarded steps)."""
        rows = self.queued
        self._queued.clear()
        self._passed.clear()
        return rows

    def resume_point(self, family: Family) -> Snapshot | None:
        """The prefix-cache snapshot a request resumes from (looked up once per request), or None."""
        lead = family[0]
        if lead.resume is False:
            lead.resume = (self.prefix_cache.longest(lead.layout)
                           if self.prefix_cache.enabled and lead.layout is not None else None)
        return lead.resume

    def _first_startable(self, free: int) -> int | None:
        """The queue index of the oldest request that fits `free` slots, unless an older one that does not fit
        has been passed `max_rows` times already (then nothing passes it)."""
        for index, family in enumerate(self._queued):
            if len(family) <= free:
                return index
            if self._passed.get(id(family), 0) >= self.max_rows:
                return None
        return None

    def _take(self, index: int) -> Family:
        family = self._queued[index]
        del self._queued[index]
        self._passed.pop(id(family), None)
        return family

    def _groups_with(self, group: list[Family], family: Family, free: int) -> bool:
        """Whether `family` may join the prefill group: rows fit, padded tokens fit, same vision options,
        and it does not resume from the prefix cache (that one is prefilled alone)."""
        leads = [f[0] for f in group] + [family[0]]
        return (sum(len(f) for f in group) + len(family) <= free and not any(r.alone for r in leads)
                and len(leads) * max(r.prompt_len for r in leads) <= self.prefill_tokens
                and len({r.downsample_mode for r in leads}) == 1 and self.resume_point(family) is None)

    def _drop_leaving(self) -> None:
        """Requests whose every row was cancelled leave the queue; those past their deadline end with a 503."""
        now = time.monotonic()
        for family in [f for f in self._queued if all(r.cancelled for r in f) or _expired(f, now)]:
            self._queued.remove(family)
            self._passed.pop(id(family), None)
            expired = not all(r.cancelled for r in family)
            self.expired += expired
            for row in family:
                row.timed_out = expired
                row.end(OverloadedError(
                    "The request waited max_generation_s for a batch slot without starting; retry later")
                    if expired else None)


def _expired(family: Family, now: float) -> bool:
    deadline = family[0].deadline
    return deadline is not None and now > deadline
