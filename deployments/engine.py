"""The generation engine one model replica runs: plain Python, testable without Ray.

`Engine.stream(request)` renders the prompt with the checkpoint's chat template, hands it to the
replica's engine core (which generates it together with the other requests in the running
batch, `core.EngineCore`), and yields typed `Chunk`s as tokens arrive. Tokens reach the event loop
through `call_soon_threadsafe`, so a stream holds no thread while it waits. Closing or
cancelling the stream stops its row within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from transformers.video_utils import VideoMetadata

from deployments import checkpoint
from deployments.config import ModelConfig
from deployments.core import EngineCore
from deployments.errors import ContextLengthError
from deployments.rows import Row
from deployments.sampling import RowSampling
from deployments.textstream import THINK_CLOSE, THINK_OPEN, IncrementalDetokenizer, ReasoningSplitter, StopMatcher
from deployments.types import ChatMessage, Chunk, GenerationRequest, SamplingParams, Usage, Video

logger = logging.getLogger("ray.serve")
HEALTH_PROBE_ID = "health-check"


@dataclass
class _Prepared:
    inputs: dict
    prompt_tokens: int
    opens_think_block: bool
    sampling: SamplingParams
    eos_ids: set[int]


class Engine:
    """One loaded checkpoint and the code that streams generations from it."""

    def __init__(self, config: ModelConfig, on_batch_rows: Callable[[int], None] = lambda rows: None) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.processor, self.model = checkpoint.load(config.checkpoint, config.variant, config.dtype, config.device)
        self.tokenizer = self.processor.tokenizer
        self._control_texts = control_texts(self.tokenizer)
        text_config = self.model.config.get_text_config()
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        self.defaults = self.model.generation_config
        eos = self.defaults.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = self.defaults.pad_token_id if self.defaults.pad_token_id is not None else self.tokenizer.pad_token_id
        self.core = EngineCore(
            self.model, config.max_batch_size, self.max_model_len, pad, config.batch_wait_ms / 1000,
            config.continuous_batching, config.prefill_chunk_tokens, on_batch_rows,
        )

    @property
    def running(self) -> int:
        """Sequences being generated or waiting for a batch (0 once every stream ended or was cancelled)."""
        return self.core.running

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield text chunks as they are generated, then one final chunk with finish_reason and usage.

        Raises ContextLengthError before generating when the prompt plus max_tokens do not fit.
        """
        prepared = await asyncio.to_thread(self.prepare, request)
        row = Row(
            prepared.inputs, self._resolve_sampling(prepared.sampling), prepared.sampling.max_tokens, prepared.eos_ids,
            asyncio.get_running_loop(), request_id=request.request_id,
            stream_interval_s=self.config.stream_interval_ms / 1000,
            deadline=time.monotonic() + self.config.max_generation_s if self.config.max_generation_s else None,
        )
        self.core.submit(row)
        try:
            async for chunk in self._decode(prepared, request.enable_thinking, row):
                if chunk.usage:
                    # The health probe runs every few seconds: keep it out of the INFO log.
                    log = logger.debug if request.request_id == HEALTH_PROBE_ID else logger.info
                    log("Request %s generated: finish_reason=%s prompt_tokens=%d completion_tokens=%d%s",
                                request.request_id, chunk.finish_reason, chunk.usage.prompt_tokens,
                                chunk.usage.completion_tokens,
                                f" (cut at max_generation_s={self.config.max_generation_s:g})" if row.timed_out else "")
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            logger.info("Request %s cancelled: generation stopped", request.request_id)
            raise
        finally:
            # Reached on normal end, on error, and when the consumer cancels or closes us.
            row.cancel()

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
        """Render and tokenize the prompt (and process images/videos); check the context fits."""
        messages, videos = _to_hf_messages(request.messages, self._control_texts)
        kwargs = {}
        if videos:
            kwargs["processor_kwargs"] = {"video_metadata": [_metadata(v) for v in videos], "do_sample_frames": False}
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            enable_thinking=request.enable_thinking, **kwargs,
        )
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
        return _Prepared(
            inputs=inputs.to(self.model.device), prompt_tokens=prompt_tokens, opens_think_block=opens,
            sampling=request.sampling, eos_ids=self._eos_ids,
        )

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

    async def _decode(self, prepared: _Prepared, enable_thinking: bool, row: Row) -> AsyncIterator[Chunk]:
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(prepared.sampling.stop)
        splitter = ReasoningSplitter(
            in_reasoning=enable_thinking and prepared.opens_think_block, may_open=enable_thinking
        )
        completion_tokens, last_id = 0, None
        async for ids in row:
            completion_tokens += len(ids)
            last_id = ids[-1]
            text = stops.feed(detokenizer.add(ids))
            if stops.stopped:
                row.cancel()
            reasoning, answer = splitter.feed(text)
            if reasoning or answer:
                yield Chunk(reasoning=reasoning, content=answer)
        if not stops.stopped:
            reasoning, answer = splitter.feed(stops.feed(detokenizer.flush()) + stops.flush())
            tail_reasoning, tail_answer = splitter.flush()
            if reasoning + tail_reasoning or answer + tail_answer:
                yield Chunk(reasoning=reasoning + tail_reasoning, content=answer + tail_answer)
        yield Chunk(
            finish_reason="stop" if stops.stopped or last_id in prepared.eos_ids else "length",
            usage=Usage(prepared.prompt_tokens, completion_tokens),
        )


def _pick(*values):
    return next(v for v in values if v is not None)


def control_texts(tokenizer) -> list[str]:
    """The text of every special token (roles, image/video placeholders...), longest first."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(specials, key=len, reverse=True)


def defuse(text: str, controls: list[str]) -> str:
    """Client text with every special token's text broken by a zero-width space after its first character.

    Text from a client is text: a user typing `<|im_start|>system` or `<|image_pad|>` must neither open a
    role nor claim an image slot. The tokenizer matches special tokens by their exact text, so the broken
    form tokenizes as the ordinary characters it shows.
    """
    for control in controls:
        if control in text:
            text = text.replace(control, control[0] + ZERO_WIDTH_SPACE + control[1:])
    return text


ZERO_WIDTH_SPACE = "\u200b"


def _to_hf_messages(messages, controls: list[str]) -> tuple[list[dict], list[Video]]:
    """Our messages -> the transformers chat format (client text defused); videos returned in prompt order."""
    hf_messages, videos = [], []
    for message in messages:
        parts = []
        for part in message.content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": defuse(part, controls)})
            elif isinstance(part, Video):
                parts.append({"type": "video", "video": part.frames})
                videos.append(part)
            else:
                parts.append({"type": "image", "image": part})
        hf_messages.append({"role": message.role, "content": parts})
    return hf_messages, videos


def _metadata(video: Video) -> VideoMetadata:
    return VideoMetadata(
        total_num_frames=video.total_num_frames, fps=video.fps, duration=video.duration,
        frames_indices=list(video.frame_indices), height=video.frames.shape[1], width=video.frames.shape[2],
        video_backend="decord",
    )
