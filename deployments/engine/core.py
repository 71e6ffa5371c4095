"""The engine core: one thread per replica runs the step loop over the running rows.

Each loop iteration (1) admits waiting requests, (2) runs at most one prefill forward of at most
`prefill_tokens` prompt tokens (a group of short prompts together, or the next chunk of a long
one) and (3) runs one decode step: one forward of the text tower over every running row, on the
engine's `SlotCache` (eager, or a compiled graph with `compile_decode`: `deployments/engine/compiled.py`),
then one batched sampling pass (`deployments/engine/sampler.py`) and one device-to-host copy. A
newcomer's prefill thus delays the running rows by one bounded forward, never by its whole prompt,
and a row that finishes or is cancelled leaves the batch before the next step.

Reuse: a request whose prompt starts with a prefix stored in the prefix cache is prefilled alone,
from that snapshot; the state at the end of each request's last user turn, when worth storing for
the chat's next turn, is snapshotted inside the forward that covers it (`deployments/engine/prefill.py`);
the vision tower runs only on the images and videos the vision cache lacks (`deployments/engine/reuse.py`).

Isolation: a row's failure ends that row only. A prefill group that fails is split and each
prompt retried alone, so only the one that cannot be prefilled fails; a row whose logits go
non-finite ends alone with an error; cancelled and timed-out rows leave without touching the
others. Only a failure of the shared decode forward itself (which no request's content reaches
but through valid token ids) ends every running row; the loop keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from deployments.engine.compiled import DecodeStep, SuffixForward
from deployments.engine.prefill import AnswerJob, Family, Prefill, StateTaps, restore, snapshot
from deployments.engine.reuse import PrefixCache, Snapshot, VisionCache
from deployments.engine.rows import Row, deliver, merge_inputs
from deployments.engine.sampler import Sampler
from deployments.engine.slots import SlotCache

logger = logging.getLogger("ray.serve")


class EngineCore:
    """Continuous batching over the model's own forward, with a cache the engine owns."""

    def __init__(self, model, max_rows: int, max_len: int, pad_token_id: int, batch_wait_s: float,
                 continuous: bool = True, prefill_tokens: int = 512,
                 on_rows: Callable[[int], None] = lambda rows: None,
                 prefix_cache: PrefixCache | None = None, vision_cache: VisionCache | None = None,
                 compile_decode: bool = False, compile_suffix: bool = False) -> None:
        self.model, self.max_rows, self.continuous = model, max_rows, continuous
        self.text, self.lm_head = model.model.language_model, model.lm_head
        self.text_config = model.config.get_text_config()
        self.device = model.device
        self._pad, self._wait_s, self._prefill_tokens, self._on_rows = pad_token_id, batch_wait_s, prefill_tokens, on_rows
        conv_dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Conv1d)), model.dtype)

        def slot_cache(**sizes) -> SlotCache:
            return SlotCache(self.text_config, max_rows, max_len, model.dtype, self.device, conv_dtype, **sizes)

        with torch.inference_mode():  # as every tensor the engine thread makes: a compiled step guards on it
            self.cache = slot_cache()
            self._next_ids = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.step = DecodeStep(self.text, self.lm_head, compile_decode, lambda: slot_cache(initial_len=16))
        self.taps = StateTaps(self.text)  # before the suffix graphs are traced: they trace through it
        self.suffix = SuffixForward(self.text, compile_suffix, self.text_config.hidden_size, model.dtype, self.device)
        self.sampler = Sampler(max_rows, self.text_config.vocab_size, self.device)
        self.prefix_cache = prefix_cache or PrefixCache(0)
        self.vision_cache = vision_cache or VisionCache(0)
        self._rows: list[Row] = []  # slot order: row i lives in slot i
        self._waiting: queue.Queue[Family | AnswerJob] = queue.Queue()
        self._queued: deque[Family] = deque()  # admitted, not yet prefilled
        self._answers: deque[AnswerJob] = deque(maxlen=max_rows)  # the oldest are dropped when full
        self.answers_carried = 0
        self._prefill: Prefill | None = None
        self.batch_sizes: list[int] = []  # rows in the batch after each admission (last 100)
        self.decode_steps = 0
        self.cancel_lags: deque[int] = deque(maxlen=100)  # decode steps from a row's cancel to its leaving
        self.cancelled_rows = 0  # rows cancelled while generating, in all
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    # ---- called from the event loop ----

    def submit(self, rows: Family) -> None:
        """Queue one request's rows (its n sequences share the prompt of the first); at most `max_rows`."""
        if not 0 < len(rows) <= self.max_rows:
            raise ValueError(f"A request may have 1 to {self.max_rows} sequences, not {len(rows)}")
        self._waiting.put(rows)

    def carry_answer(self, job: AnswerJob) -> None:
        """Store a finished turn's answer in the prefix cache as its chat's next turn will resend it, once the
        replica has nothing else to run: the next turn then prefills only its own new text. A newcomer that
        arrives meanwhile waits for that one forward, as it would for another's prefill chunk."""
        self._waiting.put(job)

    @property
    def running(self) -> int:
        """Rows being generated, prefilled or waiting (cancelled rows drop out within one step)."""
        with self._waiting.mutex:
            waiting = sum(len(family) for family in self._waiting.queue if isinstance(family, list))
        return sum(not r.finished for r in self._in_flight()) + waiting

    def _in_flight(self) -> list[Row]:
        prefilling = self._prefill.rows if self._prefill else []
        return [*self._rows, *(r for family in list(self._queued) for r in family), *prefilling]

    @property
    def rows_in_batch(self) -> int:
        """Rows the decode step computes."""
        return len(self._rows)

    def stalled_for(self) -> float:
        """Seconds a busy engine has made no step (0 when idle); inf if its thread died."""
        if not self._thread.is_alive():
            return float("inf")
        busy = self._rows or self._queued or self._prefill
        return time.monotonic() - self.last_progress if busy else 0.0

    # ---- the engine thread ----

    def _run(self) -> None:
        while True:
            try:
                self._admit()
                with torch.inference_mode():
                    if self._prefill or self._queued:
                        self._prefill_step()
                    elif self._answers and not self._rows:  # idle time only: running rows never wait for it
                        self._carry(self._answers.popleft())
                    if self._rows:
                        self._decode_step()
            except Exception as exc:  # a bug outside the guarded steps: fail what is in flight, keep serving
                logger.error("Engine loop failed", exc_info=exc)
                for row in self._in_flight():
                    row.end(exc)
                self._rows, self._queued, self._prefill = [], deque(), None
                self.sampler.rows_changed()
                self._on_rows(0)

    def _admit(self) -> None:
        """Move waiting requests to the prefill queue (and answers to carry to theirs): when idle, block for
        one and wait `batch_wait_s` for more (unless it resumes from the prefix cache); while busy (continuous
        mode), whatever waits. Cancelled requests leave here."""
        busy = bool(self._rows or self._queued or self._prefill or self._answers)
        if busy and not self.continuous:
            return
        taken = [] if busy else [self._waiting.get()]
        # A request that resumes from the prefix cache is prefilled alone: waiting for company only delays it.
        alone = bool(taken) and isinstance(taken[0], list) and self._resume_point(taken[0]) is not None
        deadline = time.monotonic() + (0.0 if busy or alone else self._wait_s)
        while True:
            try:
                taken.append(self._waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        self._queued.extend(family for family in taken if isinstance(family, list))
        self._answers.extend(job for job in taken if isinstance(job, AnswerJob))
        for family in [f for f in self._queued if all(r.cancelled for r in f)]:
            self._queued.remove(family)
            for row in family:
                row.end()
        self._mark_progress()

    def _prefill_step(self) -> None:
        """Run one prefill forward: start a group if none is running, then its next chunk."""
        if self._prefill is None:
            self._prefill = self._start_prefill()
            if self._prefill is None:
                return
        prefill = self._prefill
        try:
            logits = self._prefill_chunk(prefill)
        except Exception as exc:
            self._prefill = None
            self._prefill_failed(prefill.families, exc)
            return
        if prefill.done:
            self._prefill = None
            try:
                self._join(prefill, logits)
            except Exception as exc:  # only the newcomers fail; the running rows go on
                logger.error("Joining %d prefilled requests failed", len(prefill.rows), exc_info=exc)
                for row in prefill.rows:
                    row.end(exc)
                self._drop_finished()  # those already given a slot leave it

    def _start_prefill(self) -> Prefill | None:
        """A group from the front of the queue that fits the free slots and whose padded prompts fit
        the token budget (at least one request, when its rows fit). A request that resumes from the
        prefix cache is prefilled alone, from its snapshot."""
        free = self.max_rows - len(self._rows)
        if not self._queued or len(self._queued[0]) > free:
            return None
        group = [self._queued.popleft()]
        past = self._resume_point(group[0])
        while past is None and self._queued and self._groups_with(group, self._queued[0], free):
            group.append(self._queued.popleft())
        leads = [family[0] for family in group]
        self.batch_sizes = [*self.batch_sizes[-99:], len(self._rows) + sum(len(f) for f in group)]
        length = past.length if past else 0
        try:
            inputs = merge_inputs([r.inputs for r in leads], self._pad)
            embeds = self._embed(leads, inputs["input_ids"][:, length:], length)
        except Exception as exc:
            self._prefill_failed(group, exc)
            return None
        for family in group:
            for row in family:
                row.inputs = None  # the images live on in the embeddings, then only in the cache
            family[0].resume = None  # the snapshot lives on in the prefill's cache only (it may be evicted)
        return Prefill(group, embeds, inputs["attention_mask"], self._prefill_tokens, self.text_config, past,
                       self._stores(leads, inputs["input_ids"].shape[1], length))

    def _resume_point(self, family: Family) -> Snapshot | None:
        """The prefix-cache snapshot a request resumes from (looked up once per request), or None."""
        lead = family[0]
        if lead.resume is False:
            lead.resume = (self.prefix_cache.longest(lead.layout)
                           if self.prefix_cache.enabled and lead.layout is not None else None)
        return lead.resume

    def _stores(self, leads: list[Row], width: int, past: int) -> dict[int, list[tuple[int, bytes]]]:
        """Suffix column -> (family index, key) of each family whose last turn end is not stored yet."""
        stores: dict[int, list[tuple[int, bytes]]] = {}
        if not self.prefix_cache.enabled:
            return stores
        for index, lead in enumerate(leads):
            point = self.prefix_cache.worth_storing(lead.layout, past) if lead.layout is not None else None
            if point is None:
                continue
            column = width - lead.prompt_len + point[0] - past
            if column > 0:
                stores.setdefault(column, []).append((index, point[1]))
        return stores

    def _groups_with(self, group: list[Family], family: Family, free: int) -> bool:
        """Whether `family` may join the prefill group: rows fit, padded tokens fit, same vision options,
        and it does not resume from the prefix cache (that one is prefilled alone)."""
        leads = [f[0] for f in group] + [family[0]]
        return (sum(len(f) for f in group) + len(family) <= free and not any(r.alone for r in leads)
                and len(leads) * max(r.prompt_len for r in leads) <= self._prefill_tokens
                and len({r.downsample_mode for r in leads}) == 1 and self._resume_point(family) is None)

    def _embed(self, leads: list[Row], ids: torch.Tensor, past: int) -> torch.Tensor:
        """Token embeddings of `ids` (the group's prompts from position `past` on) with the vision
        features scattered into the image/video placeholders, as MiniCPM-V 4.6's own forward does."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(ids)
        for kind, token_id in (("image", self.model.config.image_token_id),
                               ("video", self.model.config.video_token_id)):
            parts = [part for lead in leads if (part := self._features(lead, kind, past)) is not None]
            if parts:
                values = torch.cat(parts).to(embeds.device, embeds.dtype)
                embeds = embeds.masked_scatter(inner.get_placeholder_mask(ids, embeds, values, token_id), values)
        return embeds

    def _features(self, lead: Row, kind: str, past: int) -> torch.Tensor | None:
        """One request's vision features of `kind` for its placeholders from position `past` on: from the
        vision cache where it holds an item, the vision tower (one forward for all missing items) otherwise."""
        inner = self.model.model
        pixels_key, sizes_key = ("pixel_values", "target_sizes") if kind == "image" else \
            ("pixel_values_videos", "target_sizes_videos")
        tower = inner.get_image_features if kind == "image" else inner.get_video_features
        inputs, mode = lead.inputs, lead.downsample_mode
        if pixels_key not in inputs:
            return None
        if lead.layout is None:  # placeholders that did not match the media: the whole request, uncached
            return torch.cat(tower(inputs[pixels_key][:1], inputs[sizes_key], downsample_mode=mode).pooler_output)
        items = [item for item in lead.layout.media if item.kind == kind and item.start >= past]
        if not items:
            return None
        options = mode or "default"
        cache = self.vision_cache
        found = [cache.get(item, options) if cache.enabled else None for item in items]
        missing = [item for item, features in zip(items, found) if features is None]
        if missing:
            sizes = inputs[sizes_key]
            patch = self.model.config.vision_config.patch_size
            columns = [0, *torch.cumsum(sizes.prod(-1) * patch, 0).tolist()]
            spans = [(item.first_unit, item.first_unit + len(item.runs)) for item in missing]
            pixels = torch.cat([inputs[pixels_key][:1, ..., columns[a]:columns[b]] for a, b in spans], dim=-1)
            units = torch.cat([sizes[a:b] for a, b in spans])
            pooled = tower(pixels, units, downsample_mode=mode).pooler_output
            computed, unit = {}, 0
            for item in missing:
                computed[id(item)] = torch.cat(pooled[unit : unit + len(item.runs)])
                unit += len(item.runs)
                if cache.enabled:
                    cache.put(item, options, computed[id(item)])
            found = [features if features is not None else computed[id(item)] for item, features in zip(items, found)]
        return torch.cat(found)

    def _prefill_chunk(self, prefill: Prefill) -> torch.Tensor | None:
        """Forward the next chunk of the group's prompts; after the last chunk, the logits of the last
        position (rows, vocab), else None. Snapshots the families whose last turn ends within the chunk."""
        self._mark_progress()
        (start, end), past = prefill.next_chunk(), prefill.past
        stores = prefill.stores_within(start, end)
        inside = {column - start: [index for index, _ in due] for column, due in stores.items() if column < end}
        embeds, mask = prefill.embeds[:, start:end], prefill.mask[:, : past + end]
        positions = prefill.positions[:, past + start : past + end]
        if not inside and self.suffix.covers(embeds.shape[0], past + start, end - start):
            hidden, linear = self.suffix(embeds, mask, positions, prefill.cache), {}  # a chat's later turn, mostly
        else:
            with self.taps.at(inside) as linear:
                hidden = self.text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   cache=prefill.cache, use_cache=True).last_hidden_state
        prefill.offset = end
        for column, due in stores.items():
            for index, key in due:
                length = prefill.families[index][0].layout.store_at[0]
                taps = linear.get((column - start, index))
                self.prefix_cache.store(key, prefill.snapshot(index, length, column, taps))
        return self.lm_head(hidden[:, -1]) if prefill.done else None

    def _carry(self, job: AnswerJob) -> None:
        """Prefill a turn's answer from its chat's longest stored prefix, in one forward, and store the state
        after the next user turn's opening. Skipped when nothing is stored to resume from, when the answer is
        stored already or longer than one prefill forward, or when media follow the stored prefix."""
        end, key = job.point
        past = self.prefix_cache.longest(job.layout, before=end, count=False)
        if past is None or key in self.prefix_cache or end - past.length > self._prefill_tokens \
                or any(item.start >= past.length for item in job.layout.media):
            return
        self._mark_progress()
        try:
            cache = DynamicCache(config=self.text_config)
            restore(cache, past)
            ids = job.ids[:, past.length : end].to(self.device)
            self.text(inputs_embeds=self.model.model.get_input_embeddings()(ids), cache=cache, use_cache=True,
                      position_ids=torch.arange(past.length, end, device=self.device)[None])
            self.prefix_cache.store(key, snapshot(cache, 0, end, end))
            self.answers_carried += 1
        except Exception as exc:  # only an optimisation: the next turn prefills the answer itself
            logger.warning("Carrying an answer into the prefix cache failed", exc_info=exc)

    def _prefill_failed(self, group: list[Family], exc: Exception) -> None:
        """A group that failed is retried one prompt at a time, so only the culprit fails."""
        if len(group) > 1:
            logger.warning("Prefill of %d requests together failed (%s); retrying each alone", len(group),
                           type(exc).__name__)
            for family in reversed(group):
                family[0].alone = True
                self._queued.appendleft(family)
            return
        logger.error("Prefill failed for request %s", group[0][0].request_id, exc_info=exc)
        for row in group[0]:
            row.end(exc)

    def _join(self, prefill: Prefill, logits: torch.Tensor) -> None:
        """Copy the prefilled rows into free slots (each of a request's n rows from its one prompt) and
        sample their first tokens."""
        width = prefill.mask.shape[1]
        first = len(self._rows)
        for i, family in enumerate(prefill.families):
            length = family[0].prompt_len
            for row in family:
                self.cache.load(len(self._rows), prefill.cache, i, width - length, length)
                self._rows.append(row)
        self._on_rows(len(self._rows))
        self.sampler.rows_changed()
        sizes = [len(family) for family in prefill.families]
        if max(sizes) > 1:
            logits = logits.repeat_interleave(torch.tensor(sizes, device=logits.device), dim=0)
        self._sample_and_stream(logits, first)

    def _decode_step(self) -> None:
        self._mark_progress()
        self.decode_steps += 1
        rows = len(self._rows)
        try:
            positions, mask = self.cache.begin_step(rows, masked=self.step.compiled and rows > 1)
            logits = self.step(self._next_ids[:rows, None], positions, mask, self.cache)
            self.cache.end_step()
            self._sample_and_stream(logits, 0)
        except Exception as exc:  # the shared forward failed: end what runs, keep serving
            logger.error("Decode step failed for %d requests", rows, exc_info=exc)
            for row in self._rows:
                row.end(exc)
            self._rows = []
            self._on_rows(0)

    def _sample_and_stream(self, logits: torch.Tensor, first: int) -> None:
        """Sample rows first.. (whose logits these are), stream each its token, drop finished rows."""
        rows = self._rows[first:]
        tokens, outcomes = self.sampler.sample(logits, self._rows, first)
        self._next_ids[first : first + len(rows)] = tokens
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
                self.cache.move(last, slot)
                self._next_ids[slot] = self._next_ids[last]
                self.sampler.move(last, slot)
                self._rows[slot] = self._rows[last]
            self._rows.pop()
        if len(self._rows) != keep:
            self.sampler.rows_changed()
            self._on_rows(len(self._rows))

    def _mark_progress(self) -> None:
        self.last_progress = time.monotonic()
