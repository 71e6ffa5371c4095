"""The engine core: one thread per replica runs the step loop over the running rows.

Each iteration of the loop is one step, in the manner of vLLM's `EngineCore.step`:

1. schedule: admit what waits (`deployments/engine/scheduler.py`) and pick this step's prefill work:
   the next chunk of the prefill in progress, or a new prefill group, or (idle time only) a finished
   turn's answer to carry into the prefix cache;
2. run: the model runner (`deployments/engine/runner.py`) forwards at most one prefill chunk of at
   most `prefill_tokens` prompt tokens, then one decode step over every running row;
3. sample: one batched pass over the step's logits (`deployments/engine/sampler.py`) and one
   device-to-host copy;
4. update: each row gets its token (or ends), tokens go to the event loop, finished rows leave
   their slots.

A newcomer's prefill thus delays the running rows by one bounded forward, never by its whole prompt,
and a row that finishes or is cancelled leaves the batch before the next step. The core never calls
the model: how a forward runs is the runner's business.

Isolation: a row's failure ends that row only. A prefill group that fails is split and each
prompt retried alone, so only the one that cannot be prefilled fails; a row whose logits go
non-finite ends alone with an error; cancelled and timed-out rows leave without touching the
others. Only a failure of the shared decode forward itself (which no request's content reaches
but through valid token ids) ends every running row; the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from deployments.engine.prefill import AnswerJob, Family, Prefill
from deployments.engine.reuse import PrefixCache, VisionCache
from deployments.engine.rows import Row, deliver
from deployments.engine.runner import ModelRunner
from deployments.engine.sampler import Sampler
from deployments.engine.scheduler import Scheduler

logger = logging.getLogger("ray.serve")


class EngineCore:
    """Continuous batching over a model runner: rows in slots 0..n-1, one prefill chunk and one decode per step."""

    def __init__(self, runner: ModelRunner, max_rows: int, batch_wait_s: float, continuous: bool = True,
                 prefill_tokens: int = 512, on_rows: Callable[[int], None] = lambda rows: None) -> None:
        self.runner, self.max_rows = runner, max_rows
        self._prefill_tokens, self._on_rows = prefill_tokens, on_rows
        self.scheduler = Scheduler(max_rows, prefill_tokens, batch_wait_s, continuous, runner.prefix_cache)
        self.sampler = Sampler(max_rows, runner.vocab_size, runner.device)
        self._rows: list[Row] = []  # slot order: row i lives in slot i
        self._prefill: Prefill | None = None
        self.answers_carried = 0
        self.batch_sizes: list[int] = []  # rows in the batch after each admission (last 100)
        self.decode_steps = 0
        self.cancel_lags: deque[int] = deque(maxlen=100)  # decode steps from a row's cancel to its leaving
        self.cancelled_rows = 0  # rows cancelled while generating, in all
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.runner.prefix_cache

    @property
    def vision_cache(self) -> VisionCache:
        return self.runner.vision_cache

    # ---- called from the event loop ----

    def submit(self, rows: Family) -> None:
        """Queue one request's rows (its n sequences share the prompt of the first); at most `max_rows`."""
        if not 0 < len(rows) <= self.max_rows:
            raise ValueError(f"A request may have 1 to {self.max_rows} sequences, not {len(rows)}")
        self.scheduler.submit(rows)

    def carry_answer(self, job: AnswerJob) -> None:
        """Store a finished turn's answer in the prefix cache as its chat's next turn will resend it, once the
        replica has nothing else to run: the next turn then prefills only its own new text. A newcomer that
        arrives meanwhile waits for that one forward, as it would for another's prefill chunk."""
        self.scheduler.carry_answer(job)

    @property
    def running(self) -> int:
        """Rows being generated, prefilled or waiting (cancelled rows drop out within one step)."""
        return sum(not r.finished for r in self._in_flight()) + self.scheduler.waiting_rows

    def _in_flight(self) -> list[Row]:
        prefilling = self._prefill.rows if self._prefill else []
        return [*self._rows, *self.scheduler.queued, *prefilling]

    @property
    def rows_in_batch(self) -> int:
        """Rows the decode step computes."""
        return len(self._rows)

    def stalled_for(self) -> float:
        """Seconds a busy engine has made no step (0 when idle); inf if its thread died."""
        if not self._thread.is_alive():
            return float("inf")
        busy = self._rows or self.scheduler.has_queued or self._prefill
        return time.monotonic() - self.last_progress if busy else 0.0

    # ---- the engine thread ----

    def _run(self) -> None:
        while True:
            try:
                self.scheduler.admit(busy=bool(self._rows or self._prefill))
                self._mark_progress()
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a bug outside the guarded steps: fail what is in flight, keep serving
                logger.error("Engine loop failed", exc_info=exc)
                for row in [*self._in_flight(), *self.scheduler.drain()]:
                    row.end(exc)
                self._rows, self._prefill = [], None
                self.sampler.rows_changed()
                self._on_rows(0)

    def step(self) -> None:
        """One step: the scheduled prefill work (one chunk, or an answer carried when idle), then one decode."""
        prefill = self._prefill or self._start_prefill()
        if prefill is not None:
            self._prefill_chunk(prefill)
        elif not self._rows and (job := self.scheduler.next_answer()) is not None:  # running rows never wait for it
            self._carry(job)
        if self._rows:
            self._decode()

    # ---- prefill ----

    def _start_prefill(self) -> Prefill | None:
        """The next group the scheduler gives for the free slots, embedded by the runner; None if none."""
        scheduled = self.scheduler.next_group(self.max_rows - len(self._rows))
        if scheduled is None:
            return None
        group, past = scheduled
        self.batch_sizes = [*self.batch_sizes[-99:], len(self._rows) + sum(len(f) for f in group)]
        try:
            self._prefill = self.runner.start_prefill(group, past)
        except Exception as exc:
            self._prefill_failed(group, exc)
            return None
        for family in group:
            for row in family:
                row.inputs = None  # the images live on in the embeddings, then only in the cache
            family[0].resume = None  # the snapshot lives on in the prefill's cache only (it may be evicted)
        return self._prefill

    def _prefill_chunk(self, prefill: Prefill) -> None:
        try:
            logits = self.runner.prefill_chunk(prefill)
        except Exception as exc:
            self._prefill = None
            self._prefill_failed(prefill.families, exc)
            return
        if not prefill.done:
            return
        self._prefill = None
        try:
            self._join(prefill, logits)
        except Exception as exc:  # only the newcomers fail; the running rows go on
            logger.error("Joining %d prefilled requests failed", len(prefill.rows), exc_info=exc)
            for row in prefill.rows:
                row.end(exc)
            self._drop_finished()  # those already given a slot leave it

    def _prefill_failed(self, group: list[Family], exc: Exception) -> None:
        """A group that failed is retried one prompt at a time, so only the culprit fails."""
        if len(group) > 1:
            logger.warning("Prefill of %d requests together failed (%s); retrying each alone", len(group),
                           type(exc).__name__)
            self.scheduler.retry_alone(group)
            return
        logger.error("Prefill failed for request %s", group[0][0].request_id, exc_info=exc)
        for row in group[0]:
            row.end(exc)

    def _join(self, prefill: Prefill, logits: torch.Tensor) -> None:
        """Give the prefilled rows free slots (each of a request's n rows from its one prompt) and sample their
        first tokens."""
        first = len(self._rows)
        for index, family in enumerate(prefill.families):
            for row in family:
                self.runner.join(len(self._rows), prefill, index)
                self._rows.append(row)
        self._on_rows(len(self._rows))
        self.sampler.rows_changed()
        sizes = [len(family) for family in prefill.families]
        if max(sizes) > 1:
            logits = logits.repeat_interleave(torch.tensor(sizes, device=logits.device), dim=0)
        self._sample_and_update(logits, first)

    def _carry(self, job: AnswerJob) -> None:
        try:
            self.answers_carried += self.runner.carry(job, self._prefill_tokens)
        except Exception as exc:  # only an optimisation: the next turn prefills the answer itself
            logger.warning("Carrying an answer into the prefix cache failed", exc_info=exc)

    # ---- decode ----

    def _decode(self) -> None:
        self._mark_progress()
        self.decode_steps += 1
        rows = len(self._rows)
        try:
            logits = self.runner.decode(rows)
            self._sample_and_update(logits, 0)
        except Exception as exc:  # the shared forward failed: end what runs, keep serving
            logger.error("Decode step failed for %d requests", rows, exc_info=exc)
            for row in self._rows:
                row.end(exc)
            self._rows = []
            self._on_rows(0)

    def _sample_and_update(self, logits: torch.Tensor, first: int) -> None:
        """Sample rows first.. (whose logits these are), stream each its token, drop finished rows."""
        rows = self._rows[first:]
        tokens, outcomes = self.sampler.sample(logits, self._rows, first)
        self.runner.set_next(first, tokens)
        for row, (token, error) in zip(rows, outcomes):
            if error is not None:
                row.end(error)
            else:
                row.add(token)
        deliver(rows)
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Finished rows leave; the last row takes each freed slot, so running rows stay slots 0..n-1."""
        keep = len(self._rows)
        for slot in reversed(range(len(self._rows))):
            if not self._rows[slot].finished:
                continue
            if self._rows[slot].cancel_step is not None:
                self.cancel_lags.append(self.decode_steps - self._rows[slot].cancel_step)
                self.cancelled_rows += 1
            last = len(self._rows) - 1
            if slot != last:
                self.runner.move(last, slot)
                self.sampler.move(last, slot)
                self._rows[slot] = self._rows[last]
            self._rows.pop()
        if len(self._rows) != keep:
            self.sampler.rows_changed()
            self._on_rows(len(self._rows))

    def _mark_progress(self) -> None:
        self.last_progress = time.monotonic()
