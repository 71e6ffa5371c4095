"""Generating concurrent requests together, new requests joining the batch that is already running.

One worker thread per replica owns the running batch. When idle, it takes the first waiting
request and waits at most `batch_wait_s` for more (up to `max_batch_size`). New requests are
prefilled together by a one-token `generate` (left padding; images and videos packed as the
processor packs them); the batch is then decoded by `generate` continuing from the returned cache.
Requests that arrive while it decodes join at the next step: the decoding `generate` stops, the
newcomers are prefilled, their rows are appended to the running ones (`rows.Rows`) and decoding
continues. Finished and cancelled rows leave the batch the step after they end. (transformers' own
continuous batching rejects this model's linear-attention layers; this is the same idea on plain
`generate`.) With `continuous=False` a batch runs to its end (finished rows riding along as
padding) before the next one starts.

Each row keeps its own sampling, stops on its own (eos, max_tokens, stop strings, cancellation,
deadline) and streams its tokens to its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from deployments.rows import Rows, can_merge

logger = logging.getLogger("ray.serve")

DONE = object()  # end of one row's token stream


@dataclass
class Slot:
    """One request's row in a batch: its inputs, limits and the queue its tokens go to."""

    inputs: dict | None  # the processor's output for this request alone (batch of 1); dropped once prefilled
    max_tokens: int
    min_tokens: int
    processors: LogitsProcessorList  # this row's sampling
    eos_ids: set[int]
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)  # set by the consumer: stop this row
    deadline: float | None = None  # time.monotonic() after which the row is cut (finish_reason "length")
    generated: int = 0
    finished: bool = False
    timed_out: bool = False

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.send(DONE)


def merge_inputs(inputs: list[dict], pad_token_id: int) -> dict:
    """Merge per-request processor outputs into one batch, as the processor itself would.

    Token ids and masks are left-padded; pixel tensors are packed along their last axis and
    target sizes stacked, which is how MiniCPM-V 4.6's processor packs a batch.
    """
    width = max(x["input_ids"].shape[1] for x in inputs)
    merged = {
        "input_ids": torch.cat([_left_pad(x["input_ids"], width, pad_token_id) for x in inputs]),
        "attention_mask": torch.cat([_left_pad(x["attention_mask"], width, 0) for x in inputs]),
    }
    for key in sorted({k for x in inputs for k in x} - set(merged)):
        parts = [x[key] for x in inputs if key in x]
        merged[key] = torch.cat(parts, dim=-1 if key.startswith("pixel_values") else 0)
    return merged


def _left_pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


class _RowSampler(LogitsProcessor):
    """Applies each row's own processors, and keeps eos away until a row has its min_tokens."""

    def __init__(self, slots: list[Slot], eos_ids: list[int]) -> None:
        self._slots, self._eos_ids = slots, eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, slot in enumerate(self._slots):
            if slot.generated < slot.min_tokens:
                scores[row, self._eos_ids] = float("-inf")
            if slot.processors:
                scores[row : row + 1] = slot.processors(input_ids[row : row + 1], scores[row : row + 1])
        return scores


class _RowStops(StoppingCriteria):
    """A row is done when it finished (eos, max_tokens, deadline) or its consumer asked it to stop;
    every row pauses when `interrupt()` says the batch should change (rows to drop or to admit)."""

    def __init__(self, slots: list[Slot], interrupt: Callable[[], bool] = lambda: False) -> None:
        self._slots, self._interrupt = slots, interrupt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done, now = [], time.monotonic()
        for slot in self._slots:
            if not slot.finished and slot.deadline is not None and now > slot.deadline:
                slot.timed_out = True
                slot.finish()
            if slot.stop.is_set():
                slot.finish()
            done.append(slot.finished)
        if self._interrupt():
            done = [True] * len(done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Sends each row's new token to its slot; finished rows (padding) are skipped."""

    def __init__(self, slots: list[Slot], progress: Callable[[], None]) -> None:
        self._slots = slots
        self._seen_prompt = False
        self._progress = progress

    def put(self, value: torch.Tensor) -> None:
        self._progress()
        if not self._seen_prompt:  # generate() first hands over the prompt
            self._seen_prompt = True
            return
        for slot, token in zip(self._slots, value.reshape(-1).tolist()):
            if slot.finished:
                continue
            slot.generated += 1
            slot.send([token])
            if token in slot.eos_ids or slot.generated >= slot.max_tokens:
                slot.finish()

    def end(self) -> None:
        pass  # a row that is not finished goes on in the next `generate`


class BatchRunner:
    """The replica's generation thread: admits waiting slots into the running batch and decodes it."""

    def __init__(self, generate: Callable[..., object], pad_token_id: int, max_batch_size: int,
                 batch_wait_s: float, continuous: bool = True,
                 on_rows: Callable[[int], None] = lambda rows: None) -> None:
        self._generate = generate
        self._on_rows = on_rows  # told the batch's row count whenever it changes (a metrics gauge)
        self._pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.continuous = continuous
        self._wait_s = batch_wait_s
        self._waiting: queue.Queue[Slot] = queue.Queue()
        self._slots: list[Slot] = []  # the running batch, one slot per row of `_rows`
        self._rows: Rows | None = None
        self._prefilling: list[Slot] = []
        self.batch_sizes: list[int] = []  # rows in the batch after each admission, for tests and logs
        self.last_progress = time.monotonic()  # last prefill or decode step, for health checks
        self._thread = threading.Thread(target=self._run, name="batch-generate", daemon=True)
        self._thread.start()

    def submit(self, slot: Slot) -> None:
        self._waiting.put(slot)

    def stalled_for(self) -> float:
        """Seconds a running batch has made no step (0 when idle); inf if the thread died."""
        if not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self.last_progress if self._slots or self._prefilling else 0.0

    def _mark_progress(self) -> None:
        self.last_progress = time.monotonic()

    @property
    def running(self) -> int:
        """Rows being generated or waiting to be (cancelled rows drop out within one step)."""
        return sum(not s.finished for s in [*self._slots, *self._prefilling]) + self._waiting.qsize()

    def _run(self) -> None:
        while True:
            newcomers = self._take_waiting()
            try:
                if newcomers:
                    self._admit(newcomers)
                if self._slots:
                    self._decode()
            except Exception as exc:  # decoding or merging rows failed: end what runs, keep serving
                failed = {id(slot): slot for slot in [*self._slots, *newcomers]}  # newcomers may be in both
                self._fail(list(failed.values()), exc)
                self._slots, self._rows = [], None
                self._on_rows(0)

    def _take_waiting(self) -> list[Slot]:
        """Slots to admit now: when idle, block for one and wait `batch_wait_s` for more; while
        decoding (continuous mode), whatever is waiting, up to the free rows."""
        if self._slots and not self.continuous:
            return []
        room = self.max_batch_size - len(self._slots)
        taken = [] if self._slots else [self._waiting.get()]
        deadline = time.monotonic() + (0.0 if self._slots else self._wait_s)
        while len(taken) < room:
            try:
                taken.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for slot in taken:
            if slot.stop.is_set():  # cancelled while waiting
                slot.finish()
        return [slot for slot in taken if not slot.finished]

    @property
    def rows_in_batch(self) -> int:
        """Rows the running batch computes, finished ones not yet dropped included."""
        return len(self._slots)

    def _should_pause(self) -> bool:
        """Whether decoding should stop after this step, to drop finished rows or admit waiting requests."""
        if not self.continuous:
            return False
        unfinished = sum(not s.finished for s in self._slots)
        return unfinished < len(self._slots) or (unfinished < self.max_batch_size and not self._waiting.empty())

    def _admit(self, newcomers: list[Slot]) -> None:
        """Prefill `newcomers` (their first token streams now) and append their rows to the batch."""
        self._prefilling = newcomers
        self.batch_sizes = [*self.batch_sizes[-99:], len(self._slots) + len(newcomers)]
        inputs = merge_inputs([s.inputs for s in newcomers], self._pad_token_id)
        for slot in newcomers:
            slot.inputs = None  # the images live on in `inputs`, then only in the cache
        try:
            out = self._generate_rows(newcomers, 1, **inputs)
        except Exception as exc:  # only the newcomers fail; the running rows go on
            self._fail(newcomers, exc)
            return
        finally:
            self._prefilling = []
        rows = Rows.after_generate(inputs["attention_mask"], out)
        if self._rows is None:
            self._slots, self._rows = newcomers, rows
            if self.continuous and not can_merge(rows.cache):
                logger.warning("This model's cache cannot take new rows; batches run to their end (continuous off)")
                self.continuous = False
        else:
            self._rows.extend(rows, self._pad_token_id)
            self._slots = [*self._slots, *newcomers]
        self._on_rows(len(self._slots))
        self._drop_finished()

    def _decode(self) -> None:
        """Decode the batch until every row finished, a row finished (to drop it) or new requests should join."""
        rows, slots = self._rows, self._slots
        out = self._generate_rows(slots, max(s.max_tokens - s.generated for s in slots), self._should_pause,
                                  input_ids=rows.sequences, attention_mask=rows.mask, cache=rows.cache)
        self._rows = Rows.after_generate(rows.mask, out)
        self._drop_finished()

    def _generate_rows(self, slots: list[Slot], max_new_tokens: int, interrupt: Callable[[], bool] = lambda: False,
                       **inputs) -> object:
        self._mark_progress()
        eos_ids = sorted(set().union(*(s.eos_ids for s in slots)))
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=self._pad_token_id,
            return_dict_in_generate=True,
        )
        with torch.inference_mode():
            return self._generate(
                **inputs, generation_config=config, streamer=_RowStreamer(slots, self._mark_progress),
                logits_processor=LogitsProcessorList([_RowSampler(slots, eos_ids)]),
                stopping_criteria=StoppingCriteriaList([_RowStops(slots, interrupt)]),
            )

    def _drop_finished(self) -> None:
        for slot in self._slots:
            if slot.stop.is_set():
                slot.finish()
        keep = [i for i, slot in enumerate(self._slots) if not slot.finished]
        if len(keep) == len(self._slots):
            return
        if keep:
            self._rows.select(keep)
            self._slots = [self._slots[i] for i in keep]
        else:
            self._slots, self._rows = [], None
        self._on_rows(len(self._slots))

    @staticmethod
    def _fail(slots: list[Slot], exc: Exception) -> None:
        """Hand the error to every unfinished row's consumer, which re-raises it."""
        logger.error("Generation failed for %d requests", len(slots), exc_info=exc)
        for slot in slots:
            if not slot.finished:
                slot.send(exc)
            slot.finish()
