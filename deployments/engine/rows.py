"""One request's row in the engine: its prompt, limits and sampling, and the stream of its token ids.

A `Row` is created on the replica's event loop, fed by the engine thread, and read back on the
event loop with `async for ids in row` (each item: the token ids that arrived since the last
one, so a slow reader gets several tokens per item instead of falling behind). Closing the
reader must call `row.cancel()`; the engine drops the row at its next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from deployments.engine.sampling import RowSampling

if TYPE_CHECKING:
    from deployments.engine.reuse import Layout, Snapshot

_END = object()  # end of a row's token stream


class Row:
    """A request being generated. Engine-thread side: `add`, `end`; event-loop side: iterate, `cancel`."""

    def __init__(self, inputs: dict, sampling: RowSampling, max_tokens: int, eos_ids: set[int],
                 loop: asyncio.AbstractEventLoop, deadline: float | None = None, request_id: str = "",
                 stream_interval_s: float = 0.0, logprobs: int | None = None,
                 downsample_mode: str | None = None, matcher=None, matcher_after: int | None = None,
                 layout: Layout | None = None) -> None:
        self.inputs: dict | None = inputs  # the processor's output for this request alone; dropped once prefilled
        self.prompt_ids = inputs["input_ids"][0]
        self.prompt_len = int(self.prompt_ids.shape[0])
        self.sampling, self.max_tokens, self.eos_ids = sampling, max_tokens, eos_ids
        self.generator = sampling.generator(self.prompt_ids.device)
        self.loop, self.deadline, self.request_id = loop, deadline, request_id
        self.tokens: list[int] = []
        # With `logprobs` (the number of alternatives, 0 for none) set, the engine appends each token's
        # (logprob, [(id, logprob) of the top alternatives]) before the token is delivered.
        self.want_logprobs = logprobs
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.finished = False
        self.cancel_step: int | None = None  # the engine's decode step count when a running row was cancelled
        self.timed_out = False
        self.alone = False  # prefill this row on its own (it failed in a group)
        self.downsample_mode = downsample_mode  # the vision tower's option for this request's images
        self.layout = layout  # its media and turn ends, for the prefix and vision caches (None: not cached)
        self.resume: Snapshot | None | bool = False  # the prefix snapshot it resumes from; False: not looked up
        # Constrained decoding: the grammar matcher of this row, enforced once `matcher_after` (the token that
        # ends the reasoning) was sampled, or from the start when it is None.
        self.matcher, self._matcher_after = matcher, matcher_after
        self._stop = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: list = []  # items for the consumer, handed over by `deliver`
        self._ended = False
        self._held: object | None = None
        self._interval = stream_interval_s
        self._last_item = 0.0

    @property
    def generated(self) -> int:
        return len(self.tokens)

    # ---- event loop side ----

    def cancel(self, at_step: int | None = None) -> None:
        """Stop generating this row (thread-safe; takes effect within one decode step). `at_step`: the engine's
        decode step count now, for measuring how many steps the row takes to leave."""
        if at_step is not None and not self.finished and not self.cancelled:
            self.cancel_step = at_step
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def __aiter__(self) -> Row:
        """Items are lists of token ids; with a stream interval, at most one item per interval (the first at
        once), each carrying every token that arrived meanwhile."""
        return self

    async def __anext__(self) -> list[int]:
        """The token ids generated since the last call (at least one); raises the row's error, if any."""
        if self._ended:
            raise StopAsyncIteration
        ids: list[int] = []
        item = self._held if self._held is not None else await self._queue.get()
        self._held = None
        wait = self._last_item + self._interval - time.monotonic()
        if wait > 0 and item is not _END and not isinstance(item, BaseException):
            await asyncio.sleep(wait)  # gather what else arrives: fewer, larger items
        self._last_item = time.monotonic()
        while True:
            if (item is _END or isinstance(item, BaseException)) and ids:
                self._held = item  # the tokens before the end (or error) first
                return ids
            if item is _END:
                self._ended = True
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            ids.append(item)
            if self._queue.empty():
                return ids
            item = self._queue.get_nowait()

    # ---- engine thread side ----

    @property
    def constrained(self) -> bool:
        """Whether the next token must follow the row's grammar."""
        return self.matcher is not None and self._matcher_after is None

    def follow(self, token: int) -> str | None:
        """Advance the row's grammar by the sampled token; an error message if the grammar refuses it."""
        if self.matcher is None:
            return None
        if self._matcher_after is not None:
            if token == self._matcher_after:
                self._matcher_after = None
            return None
        if self.matcher.is_stopped():  # complete: only end-of-sequence was allowed, and it ends the row
            return None
        try:
            if self.matcher.consume_token(token):
                return None
        except Exception as exc:  # a failing grammar ends its own row, never the batch's step
            return f"{type(exc).__name__}: {exc}"
        return self.matcher.get_error() or "the token does not continue the grammar"

    def add(self, token: int) -> None:
        """Record a generated token, then end the row if it is done (eos, max_tokens, cancelled, deadline)."""
        self.tokens.append(token)
        self._pending.append(token)
        if token in self.eos_ids and (self.generated >= self.sampling.min_tokens or self.matcher is not None):
            self.end()
        elif self.generated >= self.max_tokens or self.cancelled:
            self.end()
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            self.end()

    def end(self, error: BaseException | None = None) -> None:
        """Finish the row (with `error` for its consumer to raise); sends what is pending."""
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self._pending.append(error)
        self._pending.append(_END)
        deliver([self])


def deliver(rows: Sequence[Row]) -> None:
    """Hand every row's pending items to its event loop: one thread-safe call per loop, not per row."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Row]] = {}
    for row in rows:
        if row._pending:
            by_loop.setdefault(row.loop, []).append(row)
    for loop, batch in by_loop.items():
        handed = [(row, row._pending) for row in batch]
        for row in batch:
            row._pending = []
        try:
            loop.call_soon_threadsafe(_flush_all, handed)
        except RuntimeError:  # the consumer's loop is closed: nobody is reading
            for row, _ in handed:
                row.cancel()


def _flush_all(handed: list[tuple[Row, list]]) -> None:
    for row, items in handed:
        for item in items:
            row._queue.put_nowait(item)


def merge_inputs(inputs: list[dict], pad_token_id: int) -> dict:
    """The token ids and attention masks of several requests as one left-padded batch (pixels stay with
    each request: the engine runs the vision tower per request, through its vision cache)."""
    width = max(x["input_ids"].shape[1] for x in inputs)
    return {
        "input_ids": torch.cat([_left_pad(x["input_ids"], width, pad_token_id) for x in inputs]),
        "attention_mask": torch.cat([_left_pad(x["attention_mask"], width, 0) for x in inputs]),
    }


def _left_pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)
