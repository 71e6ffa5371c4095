"""The generation engine one model replica runs: plain Python, testable without Ray.

`Engine.stream(request)` renders the prompt with the checkpoint's chat template, runs
`model.generate` in a worker thread, and yields typed `Chunk`s as tokens arrive. Tokens reach
the event loop through `call_soon_threadsafe`, so a stream holds no thread while it waits.
Closing or cancelling the stream stops generation within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.video_utils import VideoMetadata

from deployments import checkpoint
from deployments.config import ModelConfig
from deployments.errors import ContextLengthError
from deployments.sampling import build_logits_processors
from deployments.textstream import THINK_CLOSE, THINK_OPEN, IncrementalDetokenizer, ReasoningSplitter, StopMatcher
from deployments.types import Chunk, GenerationRequest, SamplingParams, Usage, Video

logger = logging.getLogger("ray.serve")

_DONE = object()


class _CancelCriteria(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


class _LoopStreamer(BaseStreamer):
    """Hands each new token id to an asyncio queue from the generation thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self._loop, self._queue = loop, queue
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt
            self._seen_prompt = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _DONE)


@dataclass
class _Prepared:
    inputs: dict
    prompt_tokens: int
    opens_think_block: bool
    sampling: SamplingParams
    eos_ids: set[int]


class Engine:
    """One loaded checkpoint and the code that streams generations from it."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.processor, self.model = checkpoint.load(config.checkpoint, config.variant, config.dtype, config.device)
        self.tokenizer = self.processor.tokenizer
        text_config = self.model.config.get_text_config()
        self.max_model_len = config.max_model_len or text_config.max_position_embeddings
        self.defaults = self.model.generation_config
        eos = self.defaults.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._threads: set[threading.Thread] = set()

    @property
    def running(self) -> int:
        """Generation threads alive now (0 when every stream has ended or been cancelled)."""
        return sum(t.is_alive() for t in list(self._threads))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield text chunks as they are generated, then one final chunk with finish_reason and usage.

        Raises ContextLengthError before generating when the prompt plus max_tokens do not fit.
        """
        prepared = await asyncio.to_thread(self.prepare, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_event = threading.Event()
        thread = threading.Thread(
            target=self._generate, args=(prepared, _LoopStreamer(loop, queue), stop_event, loop, queue),
            name=f"generate-{request.request_id or id(request)}", daemon=True,
        )
        self._threads = {t for t in self._threads if t.is_alive()} | {thread}
        thread.start()
        try:
            async for chunk in self._decode(prepared, request.enable_thinking, queue, stop_event):
                if chunk.usage:
                    logger.info("Request %s generated: finish_reason=%s prompt_tokens=%d completion_tokens=%d",
                                request.request_id, chunk.finish_reason, chunk.usage.prompt_tokens,
                                chunk.usage.completion_tokens)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            logger.info("Request %s cancelled: generation stopped", request.request_id)
            raise
        finally:
            # Reached on normal end, on error, and when the consumer cancels or closes us.
            stop_event.set()

    def prepare(self, request: GenerationRequest) -> _Prepared:
        """Render and tokenize the prompt (and process images/videos); check the context fits."""
        messages, videos = _to_hf_messages(request.messages)
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

    def _generate(self, prepared: _Prepared, streamer: _LoopStreamer, stop_event: threading.Event,
                  loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        params = prepared.sampling
        processors = build_logits_processors(**self._resolve_sampling(params), device=self.model.device)
        generation_config = GenerationConfig(
            max_new_tokens=params.max_tokens, min_new_tokens=params.min_tokens, do_sample=False,
            eos_token_id=list(prepared.eos_ids), pad_token_id=self.defaults.pad_token_id,
        )
        try:
            with torch.inference_mode():
                self.model.generate(
                    **prepared.inputs, generation_config=generation_config, streamer=streamer,
                    logits_processor=processors, stopping_criteria=StoppingCriteriaList([_CancelCriteria(stop_event)]),
                )
        except Exception as exc:  # handed to the consumer, which re-raises it in the request
            logger.exception("Generation failed")
            loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    def _resolve_sampling(self, params: SamplingParams) -> dict:
        """Request values, else the checkpoint's generation_config, else neutral values."""
        defaults = self.defaults
        default_temperature = (defaults.temperature or 1.0) if defaults.do_sample else 0.0
        return {
            "temperature": _pick(params.temperature, default_temperature),
            "top_p": _pick(params.top_p, defaults.top_p, 1.0),
            "top_k": _pick(params.top_k, defaults.top_k, 0),
            "repetition_penalty": _pick(params.repetition_penalty, defaults.repetition_penalty, 1.0),
            "seed": params.seed,
        }

    async def _decode(self, prepared: _Prepared, enable_thinking: bool, queue: asyncio.Queue,
                      stop_event: threading.Event) -> AsyncIterator[Chunk]:
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(prepared.sampling.stop)
        splitter = ReasoningSplitter(
            in_reasoning=enable_thinking and prepared.opens_think_block, may_open=enable_thinking
        )
        completion_tokens, last_id = 0, None
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            completion_tokens += len(item)
            last_id = item[-1]
            text = stops.feed(detokenizer.add(item))
            if stops.stopped:
                stop_event.set()
            reasoning, answer = splitter.feed(text)
            if reasoning or answer:
                yield Chunk(reasoning=reasoning, content=answer)
            if stops.stopped:
                break
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


def _to_hf_messages(messages) -> tuple[list[dict], list[Video]]:
    """Our messages -> the transformers chat format; videos returned in prompt order."""
    hf_messages, videos = [], []
    for message in messages:
        parts = []
        for part in message.content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
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
