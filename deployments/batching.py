"""Generating concurrent requests together: one batched `model.generate` per group of requests.

One worker thread per replica takes the requests waiting when it is free (up to
`max_batch_size`, waiting at most `batch_wait_s` for more to fill the batch), merges their
prepared inputs (left padding; images and videos packed as the processor packs them) and runs
one `generate`. Each row keeps its own sampling, stops on its own (eos, max_tokens, stop
strings, cancellation) and streams its tokens to its own asyncio queue. Requests arriving while
a batch runs wait for the next one. (transformers' continuous batching rejects this model's
linear-attention layers, so rows cannot join a running batch.)
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

logger = logging.getLogger("ray.serve")

DONE = object()  # end of one row's token stream


@dataclass
class Slot:
    """One request's row in a batch: its inputs, limits and the queue its tokens go to."""

    inputs: dict  # the processor's output for this request alone (batch of 1)
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
    """A row is done when it finished (eos, max_tokens) or its consumer asked it to stop."""

    def __init__(self, slots: list[Slot]) -> None:
        self._slots = slots

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done, now = [], time.monotonic()
        for slot in self._slots:
            if not slot.finished and slot.deadline is not None and now > slot.deadline:
                slot.timed_out = True
                slot.finish()
            if slot.stop.is_set():
                slot.finish()
            done.append(slot.finished)
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
        for slot in self._slots:
            slot.finish()


class BatchRunner:
    """The replica's generation thread: forms batches from waiting slots and runs them."""

    def __init__(self, generate: Callable[..., object], pad_token_id: int, max_batch_size: int,
                 batch_wait_s: float) -> None:
        self._generate = generate
        self._pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._wait_s = batch_wait_s
        self._waiting: queue.Queue[Slot] = queue.Queue()
        self._active: list[Slot] = []
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and logs
        self.last_progress = time.monotonic()  # last prefill or decode step, for health checks
        self._thread = threading.Thread(target=self._run, name="batch-generate", daemon=True)
        self._thread.start()

    def submit(self, slot: Slot) -> None:
        self._waiting.put(slot)

    def stalled_for(self) -> float:
        """Seconds a running batch has made no step (0 when idle); inf if the thread died."""
        if not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self.last_progress if self._active else 0.0

    def _mark_progress(self) -> None:
        self.last_progress = time.monotonic()

    @property
    def running(self) -> int:
        """Rows being generated or waiting to be (cancelled rows drop out within one step)."""
        return sum(not s.finished for s in self._active) + self._waiting.qsize()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._run_batch(batch)

    def _next_batch(self) -> list[Slot]:
        batch = [self._waiting.get()]
        deadline = time.monotonic() + self._wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for slot in batch:
            if slot.stop.is_set():  # cancelled while waiting
                slot.finish()
        return [slot for slot in batch if not slot.finished]

    def _run_batch(self, batch: list[Slot]) -> None:
        self._active = batch
        self._mark_progress()
        self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
        eos_ids = sorted(set().union(*(s.eos_ids for s in batch)))
        config = GenerationConfig(
            max_new_tokens=max(s.max_tokens for s in batch), do_sample=False,
            eos_token_id=eos_ids, pad_token_id=self._pad_token_id,
        )
        try:
            with torch.inference_mode():
                self._generate(
                    **merge_inputs([s.inputs for s in batch], self._pad_token_id),
                    generation_config=config, streamer=_RowStreamer(batch, self._mark_progress),
                    logits_processor=LogitsProcessorList([_RowSampler(batch, eos_ids)]),
                    stopping_criteria=StoppingCriteriaList([_RowStops(batch)]),
                )
        except Exception as exc:  # handed to every row's consumer, which re-raises it
            logger.exception("Batched generation failed for %d requests", len(batch))
            for slot in batch:
                if not slot.finished:
                    slot.send(exc)
        finally:
            for slot in batch:
                slot.finish()
            self._active = []
