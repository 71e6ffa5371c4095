"""The generation engine one model replica runs: plain Python, testable without Ray.

`Engine.stream(request)` renders the prompt with the checkpoint's chat template, hands it to the
replica's engine core (which generates it together with the other requests in the running
batch, `core.EngineCore`), and yields typed `Chunk`s as tokens arrive. Tokens reach the event loop
through `call_soon_threadsafe`, so a stream holds no thread while it waits. Closing or
cancelling the stream stops its row within one decode step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import jinja2
import torch
from PIL import Image

from deployments.engine import checkpoint
from deployments.common.config import ModelConfig
from deployments.common.lru import cache_state
from deployments.engine.core import EngineCore
from deployments.engine.runner import TransformersRunner
from deployments.common.errors import BadRequestError, ContextLengthError
from deployments.engine.grammar import Grammars
from deployments.engine.inputs import control_texts, defuse_all, to_hf_messages, video_metadata
from deployments.engine.outputs import LogprobReader, merge_streams
from deployments.engine.prefill import AnswerJob
from deployments.engine import reuse
from deployments.engine.rows import Row
from deployments.engine.sampling import RowSampling
from deployments.engine.textstream import THINK_CLOSE, THINK_OPEN, IncrementalDetokenizer, ReasoningSplitter, StopMatcher
from deployments.common.types import ChatMessage, Chunk, GenerationRequest, SamplingParams, Usage, Video

logger = logging.getLogger("ray.serve")
HEALTH_PROBE_ID = "health-check"


@dataclass
class _Prepared:
    inputs: dict
    prompt_tokens: int
    opens_think_block: bool
    sampling: SamplingParams
    eos_ids: set[int]
    matchers: list  # one grammar matcher per sequence (None: unconstrained)
    matcher_after: int | None  # the grammar applies once this token (the end of the reasoning) was sampled
    layout: reuse.Layout | None  # media and turn ends, for the prefix and vision caches


class Engine:
    """One loaded checkpoint and the code that streams generations from it."""

    def __init__(self, config: ModelConfig, on_batch_rows: Callable[[int], None] = lambda rows: None,
                 on_cache: reuse.CacheObserver = lambda cache, event, amount: None) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.processor, self.model = checkpoint.load(config.checkpoint, config.variant, config.dtype, config.device)
        self.processor_cache = reuse.ProcessorCache(config.processor_cache_bytes, on_cache)
        if self.processor_cache.enabled:
            self.processor_cache.install(self.processor)
        self.tokenizer = self.processor.tokenizer
        self._control_texts = control_texts(self.tokenizer)
        text_config = self.model.config.get_text_config()
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        self.defaults = self.model.generation_config
        eos = self.defaults.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = self.defaults.pad_token_id if self.defaults.pad_token_id is not None else self.tokenizer.pad_token_id
        self._think_close = self.tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self.grammars = Grammars(self.tokenizer, text_config.vocab_size, sorted(self._eos_ids))
        ids = self.tokenizer.convert_tokens_to_ids
        self._special = reuse.SpecialIds(turn_end=ids("<|im_end|>"), media_start=ids(self.processor.image_start_token),
                                         image=self.model.config.image_token_id, video=self.model.config.video_token_id,
                                         user_opening=self._user_opening())
        # Cache keys are namespaced by what was loaded: entries never outlive a change of checkpoint.
        self._namespace = f"{config.checkpoint}:{config.variant}:{self.model.dtype}"
        runner = TransformersRunner(
            self.model, config.max_batch_size, self.max_model_len, pad, config.prefill_chunk_tokens,
            reuse.PrefixCache(config.prefix_cache_bytes, on_cache, config.prefix_cache_min_tokens,
                              every_turn=not config.prefix_cache_answers),
            reuse.VisionCache(config.vision_cache_bytes, on_cache), config.compile_decode,
            config.compile_resumed_prefill, config.decode_path,
        )
        self.core = EngineCore(runner, config.max_batch_size, config.batch_wait_ms / 1000,
                               config.continuous_batching, config.prefill_chunk_tokens, on_batch_rows)

    def _user_opening(self) -> tuple[int, ...]:
        """The ids that open a user turn in this chat template (`<|im_start|>user\n`), as they tokenize inside
        a rendered conversation; () when the template does not open one that way (no boundary there then)."""
        try:
            text = self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                                      tokenize=False)
            start = text.rindex("<|im_start|>")
            opening = self.tokenizer.encode(text[start : text.index("\n", start) + 1], add_special_tokens=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except (ValueError, jinja2.TemplateError):
            return ()
        found = any(ids[i : i + len(opening)] == opening for i in range(len(ids)))
        return tuple(opening) if found and self.tokenizer.decode(opening).endswith("user\n") else ()

    @property
    def running(self) -> int:
        """Sequences being generated or waiting for a batch (0 once every stream ended or was cancelled)."""
        return self.core.running

    def stats(self) -> dict:
        """What the engine reports of itself (the replica's `process_info()`): running sequences, the rows in
        its batch after each of the last 100 admissions, the decode steps each of the last 100 cancelled rows
        took to leave the batch, its caches' bytes, hits and misses (and answers carried into the prefix
        cache), and whether its decode steps and resumed prefills run compiled."""
        core, config = self.core, self.config
        forwards = core.runner.stats(config.compile_decode, config.compile_resumed_prefill)
        stats = {"running": core.running, "torch_threads": torch.get_num_threads(),
                 "batch_sizes": list(core.batch_sizes), "cancel_lags": list(core.cancel_lags),
                 "cancelled_rows": core.cancelled_rows,
                 "prefix_cache": {**cache_state(core.prefix_cache), "answers_carried": core.answers_carried},
                 "vision_cache": cache_state(core.vision_cache),
                 "decode": {**forwards["decode"], "steps": core.decode_steps},
                 "resumed_prefill": forwards["resumed_prefill"],
                 "scheduler": {"passed_over": core.scheduler.passed_over, "expired": core.scheduler.expired}}
        if self.processor_cache.enabled:
            stats["processor_cache"] = cache_state(self.processor_cache)
        return stats

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield text chunks as they are generated, then one final chunk with finish_reason and usage;
        with n > 1, the chunks of sequences 0..n-1 interleaved (each sequence ends with its final chunk).

        Raises ContextLengthError before generating when the prompt plus max_tokens do not fit, and
        BadRequestError for sampling values this checkpoint cannot honour.
        """
        prepared = await asyncio.to_thread(self.prepare, request)
        rows = [self._row(prepared, request, index) for index in range(prepared.sampling.n)]
        self.core.submit(rows)
        decoders = [self._decode(prepared, request.enable_thinking, row, index) for index, row in enumerate(rows)]
        answer = []
        try:
            async for chunk in decoders[0] if len(decoders) == 1 else merge_streams(decoders):
                answer.append(chunk.content)
                if chunk.usage:
                    self._log_end(request.request_id, chunk, rows[chunk.index])
                    if len(rows) == 1:
                        self._carry_answer(request, prepared, "".join(answer))
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            logger.info("Request %s cancelled: generation stopped", request.request_id)
            raise
        finally:
            # Reached on normal end, on error, and when the consumer cancels or closes us.
            for row in rows:
                row.cancel(at_step=self.core.decode_steps)

    def _row(self, prepared: _Prepared, request: GenerationRequest, index: int) -> Row:
        """The row of sequence `index`; the n sequences of a seeded request draw from seeds seed, seed+1, ..."""
        sampling = self._resolve_sampling(prepared.sampling)
        if sampling.seed is not None and index:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**64)
        return Row(
            prepared.inputs, sampling, prepared.sampling.max_tokens, prepared.eos_ids, asyncio.get_running_loop(),
            request_id=request.request_id, stream_interval_s=self.config.stream_interval_ms / 1000,
            deadline=time.monotonic() + self.config.max_generation_s if self.config.max_generation_s else None,
            logprobs=prepared.sampling.logprobs, downsample_mode=request.downsample_mode,
            matcher=prepared.matchers[index], matcher_after=prepared.matcher_after, layout=prepared.layout,
        )

    def _carry_answer(self, request: GenerationRequest, prepared: _Prepared, answer: str) -> None:
        """Have the core store this turn's answer for the chat's next turn (in a worker thread: it renders the
        conversation again), when the prefix cache follows this chat and the answer will be resent as text."""
        if self.config.prefix_cache_answers and not request.tools and prepared.layout is not None \
                and self.core.prefix_cache.holds_chat(prepared.layout):
            asyncio.get_running_loop().run_in_executor(None, self._answer_job, request, answer)

    def _answer_job(self, request: GenerationRequest, answer: str) -> None:
        """Render the conversation as its next turn will resend it (the answer, then a blank user turn, whose
        content does not change the tokens before it) and queue the point after that user turn's opening (its
        last boundary but one: the assistant turn's end where the template's opening was not found) for the core."""
        try:
            follow = dataclasses.replace(request, messages=[
                *request.messages, ChatMessage("assistant", [answer]), ChatMessage("user", [""])])
            with reuse.uncounted():  # the engine's own render: no request's hits or misses
                inputs = self._render(follow)
            layout = self._layout(follow, inputs)
            if layout is not None and len(layout.boundaries) >= 2:
                self.core.carry_answer(AnswerJob(inputs["input_ids"], layout, layout.boundaries[-2]))
        except Exception as exc:  # only an optimisation: the next turn prefills the answer itself
            logger.warning("Rendering request %s's answer for the prefix cache failed", request.request_id,
                           exc_info=exc)

    @staticmethod
    def _log_end(request_id: str, chunk: Chunk, row: Row) -> None:
        # The health probe runs every few seconds: keep it out of the INFO log.
        log = logger.debug if request_id == HEALTH_PROBE_ID else logger.info
        log("Request %s%s generated: finish_reason=%s prompt_tokens=%d completion_tokens=%d%s", request_id,
            f" (sequence {chunk.index})" if chunk.index else "", chunk.finish_reason, chunk.usage.prompt_tokens,
            chunk.usage.completion_tokens, " (cut at max_generation_s)" if row.timed_out else "")

    async def check_health(self) -> None:
        """Raise if this replica can no longer generate: its batch thread died or stalled, or,
        when idle, a one-token generation does not complete."""
        stalled = self.core.stalled_for()
        if stalled > self.config.health_check_stall_s:
            raise RuntimeError(f"Generation made no progress for {stalled:.0f} s")
        if self.core.running == 0:
            probe = GenerationRequest([ChatMessage("user", ["ping"])], enable_thinking=False,
                                      sampling=SamplingParams(max_tokens=1, temperature=0.0), request_id=HEALTH_PROBE_ID)
            async for _ in self.stream(probe):
                pass

    def prepare(self, request: GenerationRequest) -> _Prepared:
        """Render and tokenize the prompt (and process images/videos); check the context fits and the sampling
        values; build the grammar matchers of a constrained request. Raises BadRequestError subclasses."""
        self._check_sampling(request.sampling)
        inputs = self._render(request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        max_tokens = request.sampling.max_tokens
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's context is {self.max_model_len} tokens; the request has {prompt_tokens} prompt "
                f"tokens and asks for up to {max_tokens} more. Shorten the conversation or lower max_tokens.",
                param="max_tokens",
            )
        tail = self.tokenizer.decode(inputs["input_ids"][0, -8:])
        opens = tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)
        # With thinking on, the answer (what a constraint governs) starts after the model closes its reasoning.
        after = self._think_close if opens and request.enable_thinking and self._think_close is not None else None
        matchers = ([None] * request.sampling.n if request.constraint is None else
                    self.grammars.matchers(request.constraint, after is not None, request.sampling.n))
        return _Prepared(
            inputs=inputs.to(self.model.device), prompt_tokens=prompt_tokens, opens_think_block=opens,
            sampling=request.sampling, eos_ids=self._eos_ids | set(request.sampling.stop_token_ids),
            matchers=matchers, matcher_after=after, layout=self._layout(request, inputs),
        )

    def _layout(self, request: GenerationRequest, inputs) -> reuse.Layout | None:
        """The prompt's layout for the caches (digests of its images and videos); None when both are off, and
        for the health probe (which would otherwise count as hits and misses every few seconds)."""
        if request.request_id == HEALTH_PROBE_ID or not (self.core.prefix_cache.enabled
                                                          or self.core.vision_cache.enabled):
            return None
        parts = [part for message in request.messages for part in message.content]
        images = [part for part in parts if isinstance(part, Image.Image)]
        videos = [part for part in parts if isinstance(part, Video)]
        namespace = f"{self._namespace}:{request.downsample_mode or 'default'}"
        found = reuse.layout(inputs["input_ids"][0], self._special, images, videos, namespace)
        if found is None and (images or videos):
            logger.warning("Request %s: its placeholders do not match its media; not cached", request.request_id)
        return found

    def _render(self, request: GenerationRequest):
        """The processor's output for the conversation (client text defused) with its tools and media options."""
        messages, videos = to_hf_messages(request.messages, self._control_texts)
        processor_kwargs = {"downsample_mode": request.downsample_mode} if request.downsample_mode else {}
        if videos:
            processor_kwargs |= {"video_metadata": [video_metadata(v) for v in videos], "do_sample_frames": False}
        tools = [{"type": "function", "function": defuse_all(tool, self._control_texts)} for tool in request.tools or []]
        try:
            with reuse.known_videos(videos):
                return self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                    enable_thinking=request.enable_thinking, tools=tools or None,
                    **({"processor_kwargs": processor_kwargs} if processor_kwargs else {}),
                )
        except jinja2.TemplateError as exc:  # the template refuses the conversation (its own message)
            raise BadRequestError(f"The chat template refused the conversation: {exc}", param="messages") from None

    def _check_sampling(self, sampling: SamplingParams) -> None:
        vocab = self.model.config.get_text_config().vocab_size
        outside = [i for i in sampling.stop_token_ids if not 0 <= i < vocab]
        if outside:
            raise BadRequestError(f"stop_token_ids {outside} are outside this model's vocabulary (0..{vocab - 1})",
                                  param="stop_token_ids")
        if not 1 <= sampling.n <= self.config.max_batch_size:
            raise BadRequestError(f"n is {sampling.n}; this model generates at most {self.config.max_batch_size} "
                                  "sequences per request (its max_batch_size)", param="n")

    def _resolve_sampling(self, params: SamplingParams) -> RowSampling:
        """Request values, else the checkpoint's generation_config, else neutral values."""
        defaults = self.defaults
        default_temperature = (defaults.temperature or 1.0) if defaults.do_sample else 0.0
        return RowSampling(
            temperature=_pick(params.temperature, default_temperature),
            top_p=_pick(params.top_p, defaults.top_p, 1.0),
            top_k=_pick(params.top_k, defaults.top_k, 0),
            repetition_penalty=_pick(params.repetition_penalty, defaults.repetition_penalty, 1.0),
            seed=params.seed, min_tokens=params.min_tokens,
        )

    async def _decode(self, prepared: _Prepared, enable_thinking: bool, row: Row, index: int = 0
                      ) -> AsyncIterator[Chunk]:
        """One sequence's chunks: text split into reasoning and answer, cut at stop strings; the ids that
        end it (eos, stop_token_ids) add no text."""
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(prepared.sampling.stop)
        splitter = ReasoningSplitter(
            in_reasoning=enable_thinking and prepared.opens_think_block, may_open=enable_thinking
        )
        logprobs = LogprobReader(row, self.tokenizer)
        completion_tokens, last_id = 0, None
        async for ids in row:
            completion_tokens += len(ids)
            last_id = ids[-1]
            text = stops.feed(detokenizer.add(ids[:-1] if last_id in prepared.eos_ids else ids))
            if stops.stopped:
                row.cancel()
            reasoning, answer = splitter.feed(text)
            if reasoning or answer:
                yield Chunk(reasoning=reasoning, content=answer, index=index, logprobs=logprobs.read(completion_tokens))
        if not stops.stopped:
            reasoning, answer = splitter.feed(stops.feed(detokenizer.flush()) + stops.flush())
            tail_reasoning, tail_answer = splitter.flush()
            if reasoning + tail_reasoning or answer + tail_answer:
                yield Chunk(reasoning=reasoning + tail_reasoning, content=answer + tail_answer, index=index,
                            logprobs=logprobs.read(completion_tokens))
        yield Chunk(
            finish_reason="stop" if stops.stopped or last_id in prepared.eos_ids else "length",
            usage=Usage(prepared.prompt_tokens, completion_tokens), index=index,
            logprobs=logprobs.read(completion_tokens),
        )


def _pick(*values):
    return next(v for v in values if v is not None)
