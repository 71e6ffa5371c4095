"""Plain types that cross the router -> replica boundary (Ray pickles them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from deployments.common.errors import MediaError

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
Variant = Literal["instruct", "thinking"]


@dataclass
class Video:
    """Decoded, already-sampled video frames with the metadata the processor needs."""

    frames: np.ndarray  # (num_frames, height, width, 3), uint8 RGB
    fps: float  # of the source video
    duration: float  # seconds, of the source video
    frame_indices: list[int]  # indices of `frames` in the source video
    total_num_frames: int
    digest: bytes = b""  # of the frames, set by the router after decoding (deployments.common.digest)


def media_nbytes(item: Image.Image | Video) -> int:
    """The bytes an image or video holds decoded (what the caches and stores that keep it count)."""
    if isinstance(item, Image.Image):
        return item.width * item.height * len(item.getbands())
    return item.frames.nbytes


@dataclass(frozen=True)
class MediaRef:
    """An image or video by the digest of its decoded pixels, in place of the item: the router sends one for
    an item it handed to the model deployment before, and the replica resolves it (deployments.common.handoff)."""

    kind: Literal["image", "video"]
    digest: bytes


# One part of a message's content: text, an image or a video (a MediaRef only between router and replica).
ContentPart = str | Image.Image | Video


@dataclass
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: list[ContentPart]
    reasoning: str | None = None  # an assistant turn's reasoning_content
    tool_calls: list[dict] | None = None  # an assistant turn's calls: {"name": str, "arguments": dict}

    def __reduce__(self):
        # RGB images cross processes as arrays: Ray hands an array's buffer over without pickling it, where
        # a PIL image pickles its pixels through its encoder (measured: 8-12 ms to pickle and 5-8 ms to load
        # a 1280x960 image, against about 3 ms each way for the array).
        content = [_ImageArray(np.asarray(part), dict(part.info)) if isinstance(part, Image.Image)
                   and part.mode == "RGB" else part for part in self.content]
        return _message, (self.role, content, self.reasoning, self.tool_calls)


@dataclass
class _ImageArray:
    pixels: np.ndarray  # (height, width, 3), uint8
    info: dict


def _message(role, content, reasoning, tool_calls) -> ChatMessage:
    parts = []
    for part in content:
        if isinstance(part, _ImageArray):
            image = Image.fromarray(part.pixels, "RGB")
            image.info.update(part.info)
            part = image
        parts.append(part)
    return ChatMessage(role, parts, reasoning, tool_calls)


@dataclass(frozen=True)
class Constraint:
    """What the answer (after any reasoning) must be, enforced while decoding.

    json_object: any JSON object; json_schema: a JSON value valid against `schema`; tool_calls: one call (or
    several, with `parallel`) in the model's tool-call format, to one of `tools` (function definitions),
    with arguments valid against that function's parameter schema.
    """

    kind: Literal["json_object", "json_schema", "tool_calls"]
    schema: dict | None = None
    tools: tuple[dict, ...] = ()
    parallel: bool = True


@dataclass
class SamplingParams:
    """Decoding parameters. None means: the checkpoint's generation_config default."""

    max_tokens: int = 512
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 = off
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Suppresses end-of-sequence for this many tokens: benchmarks and tests ask for exact lengths.
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # end the sequence like eos; their text is dropped
    n: int = 1  # sequences generated from one prompt (one prefill), streamed as choices 0..n-1
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's log-probability and the k most likely


@dataclass
class GenerationRequest:
    messages: list[ChatMessage]
    enable_thinking: bool
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    downsample_mode: Literal["16x", "4x"] | None = None  # None: the checkpoint's default (16x)
    tools: list[dict] | None = None  # function definitions rendered into the prompt by the chat template
    constraint: Constraint | None = None
    # Digest of the chat's opening (what every later turn resends): its turns share a home replica.
    affinity: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """A token's text and log-probability under the model's raw distribution, with its top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """One piece of a generation stream.

    Every chunk but the last of a sequence carries text: `reasoning` (inside `<think>...</think>`)
    and/or `content` (the answer). The last chunk of every sequence carries `finish_reason` and
    `usage` (its own completion tokens). `index` names the sequence (0..n-1). `logprobs`, when
    asked for, covers the tokens generated since the previous chunk of the sequence.
    """

    reasoning: str = ""
    content: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


class ImageBudget:
    """The decoded RGB bytes one request's images may still take (`max_image_decoded_bytes`)."""

    def __init__(self, total: int) -> None:
        self.total = self.left = total

    def take(self, width: int, height: int) -> None:
        """Account for one image of this size, before it is decoded; a 400 when it does not fit."""
        needed = width * height * 3
        if needed > self.left:
            raise MediaError(f"The request's images decode to more than {self.total} bytes (an image of "
                             f"{width}x{height} needs {needed}, {max(self.left, 0)} are left): send smaller images")
        self.left -= needed
