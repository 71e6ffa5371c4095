"""OpenAI chat requests -> generation requests, and generation chunks -> OpenAI responses.

Pure functions over the schemas and types: the router calls them, tests call them directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from deployments.common.config import MediaConfig, ModelConfig, RouterArgs
from deployments.common.errors import BadRequestError, ModelNotFoundError, ServiceError, error_body
from deployments.ingress.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    ResponseToolCall,
    DeltaMessage,
    ImagePart,
    Message,
    NamedToolChoice,
    ResponseMessage,
    StreamChoice,
    TextPart,
    UsageInfo,
    VideoPart,
)
from deployments.ingress.tools import ToolCallDelta, ToolCallParser, parse_tool_calls
from deployments.common.types import (
    ChatMessage, Chunk, Constraint, ContentPart, FinishReason, GenerationRequest, ImageBudget, SamplingParams, Usage,
)

# Fetches and decodes the media of one image_url / video_url part; takes `videos_in_request=` (the
# request's videos share one decoded-bytes budget) and `images=` (an ImageBudget its images share).
LoadMedia = Callable[..., Awaitable[ContentPart]]


def choose_variant(request: ChatCompletionRequest, variants: dict[str, ModelConfig]) -> tuple[ModelConfig, bool]:
    """Pick the deployment and the enable_thinking flag for a request.

    One boolean decides: `chat_template_kwargs.enable_thinking` when sent, else whether
    `model` names the thinking variant. With both variants loaded it also picks the
    deployment; with one, that one serves both and only enable_thinking flips.
    Raises ModelNotFoundError for a `model` that names no loaded variant.
    """
    named = _named_variant(request.model, variants)
    kwargs = request.chat_template_kwargs
    thinking = kwargs.enable_thinking if kwargs and kwargs.enable_thinking is not None else named == "thinking"
    if len(variants) == 1:
        return next(iter(variants.values())), thinking
    return variants["thinking" if thinking else "instruct"], thinking


def _named_variant(model: str | None, variants: dict[str, ModelConfig]) -> str | None:
    if model is None:
        return None
    for variant, config in variants.items():
        if model in (variant, config.name):
            return variant
    # A name of the other, unloaded variant is still a known model in single-variant mode.
    for variant in ("instruct", "thinking"):
        if model in (variant, ModelConfig(variant=variant).name):
            return variant
    names = ", ".join(sorted({c.name for c in variants.values()} | set(variants)))
    raise ModelNotFoundError(f"The model '{model}' does not exist. Available: {names}", param="model")


async def to_generation_request(
    request: ChatCompletionRequest, enable_thinking: bool, request_id: str, limits: RouterArgs,
    load_media: LoadMedia,
) -> GenerationRequest:
    """Convert an OpenAI request (already validated by pydantic) into the replica's request.

    Checks the router's limits (messages, max_tokens, image and video counts) before fetching or
    decoding anything.
    """
    request.check_supported()
    if len(request.messages) > limits.max_messages:
        raise BadRequestError(f"The request has {len(request.messages)} messages; the limit is {limits.max_messages}",
                              param="messages")
    if (request.requested_max_tokens or 0) > limits.max_tokens_cap:
        raise BadRequestError(f"max_tokens is {request.requested_max_tokens}; this server allows at most "
                              f"{limits.max_tokens_cap}", param="max_tokens")
    _check_content_size(request, limits)
    videos, images = _check_media_counts(request, limits.media)
    load = load_media
    if videos:
        load = functools.partial(load, videos_in_request=videos)
    if images:  # the request's images share one budget of decoded bytes
        load = functools.partial(load, images=ImageBudget(limits.media.max_image_decoded_bytes))
    messages = [await _message(m, load) for m in request.messages]
    if messages[-1].role == "assistant":
        raise BadRequestError("The last message must not be an assistant message", param="messages")
    sampling = SamplingParams(
        max_tokens=request.requested_max_tokens or limits.default_max_tokens,
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        repetition_penalty=request.repetition_penalty, seed=request.seed, stop=list(request.stop or []),
        min_tokens=request.min_tokens, stop_token_ids=list(request.stop_token_ids or []), n=request.n,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )
    if sampling.min_tokens > sampling.max_tokens:
        raise BadRequestError("min_tokens must not exceed max_tokens", param="min_tokens")
    mm = request.mm_processor_kwargs
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []] if request.uses_tools else None
    return GenerationRequest(messages=messages, enable_thinking=enable_thinking, sampling=sampling,
                             request_id=request_id, downsample_mode=mm.downsample_mode if mm else None,
                             tools=tools, constraint=constraint(request), affinity=affinity(request))


def affinity(request: ChatCompletionRequest) -> str:
    """A digest of the chat's opening: its messages up to the first user message (system prompt, tools and
    media URLs included), which every later turn of the chat resends unchanged."""
    opening = []
    for message in request.messages:
        opening.append(message.model_dump(mode="json", exclude_none=True))
        if message.role == "user":
            break
    tools = [tool.model_dump(mode="json", exclude_none=True) for tool in request.tools or []]
    h = hashlib.sha256()
    _feed(h, [opening, tools])
    return h.hexdigest()[:32]


def _feed(h, value) -> None:
    """Hash a JSON-like value without serialising it: each string once, as it is (a data URL of megabytes
    costs one pass of the hash, not JSON escaping first); type tags and lengths keep the encoding unambiguous."""
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif isinstance(value, dict):
        h.update(b"d%d:" % len(value))
        for key in sorted(value):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d:" % len(value))
        for item in value:
            _feed(h, item)
    else:  # numbers, booleans, None
        text = repr(value).encode()
        h.update(b"v%d:" % len(text))
        h.update(text)


def constraint(request: ChatCompletionRequest) -> Constraint | None:
    """What decoding must enforce: a tool call (required / named function), else the response format."""
    choice = request.tool_choice
    if request.uses_tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        functions = [tool.function for tool in request.tools or []
                     if not isinstance(choice, NamedToolChoice) or tool.function.name == choice.function.name]
        return Constraint("tool_calls", tools=tuple(f.model_dump(exclude_none=True) for f in functions),
                          parallel=request.parallel_tool_calls)
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    return Constraint("json_schema", schema=fmt.json_schema.schema_) if fmt.json_schema else Constraint("json_object")


def parsed_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The function definitions whose calls are parsed out of the answer (None: no parsing)."""
    return [tool.function.model_dump(exclude_none=True) for tool in request.tools or []] if request.uses_tools else None


async def _message(message: Message, load: LoadMedia) -> ChatMessage:
    calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []]
    return ChatMessage(role="system" if message.role == "developer" else message.role,
                       content=await _content(message.content, load), reasoning=message.reasoning_content,
                       tool_calls=calls or None)


def _check_content_size(request: ChatCompletionRequest, limits: RouterArgs) -> None:
    chars = 0
    for i, message in enumerate(request.messages):
        parts = message.content if isinstance(message.content, list) else [message.content or ""]
        if len(parts) > limits.max_content_parts:
            raise BadRequestError(f"Message {i} has {len(parts)} content parts; the limit is "
                                  f"{limits.max_content_parts}", param=f"messages.{i}.content")
        chars += sum(len(p) if isinstance(p, str) else len(p.text) for p in parts if isinstance(p, str | TextPart))
        # Every other string the client sends that the template renders counts too.
        chars += len(message.reasoning_content or "") + len(message.name or "") + len(message.tool_call_id or "")
        chars += sum(len(c.id) + len(c.function.name) + len(c.function.arguments) for c in message.tool_calls or [])
    # Tool definitions are rendered into the prompt, and they and a response schema become grammars.
    chars += sum(len(tool.model_dump_json()) for tool in request.tools or [])
    if request.response_format and request.response_format.json_schema:
        chars += len(request.response_format.json_schema.model_dump_json())
    if chars > limits.max_text_chars:
        raise BadRequestError(f"The request has {chars} characters of text; the limit is {limits.max_text_chars}",
                              param="messages")


def _check_media_counts(request: ChatCompletionRequest, limits: MediaConfig) -> tuple[int, int]:
    """Raise for too many images or videos; the numbers of videos and of images."""
    parts = [p for m in request.messages if isinstance(m.content, list) for p in m.content]
    for kind, part_type, limit in (("images", ImagePart, limits.max_images_per_request),
                                   ("videos", VideoPart, limits.max_videos_per_request)):
        count = sum(isinstance(p, part_type) for p in parts)
        if count > limit:
            raise BadRequestError(f"The request has {count} {kind}; the limit is {limit}", param="messages")
    return sum(isinstance(p, VideoPart) for p in parts), sum(isinstance(p, ImagePart) for p in parts)


async def _content(content, load_media: LoadMedia) -> list[ContentPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    parts: list[ContentPart] = []
    for part in content:
        if isinstance(part, TextPart):
            parts.append(part.text)
        else:
            parts.append(await load_media(part))
    return parts


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(error: ServiceError, request_id: str) -> str:
    """The SSE event for an error after the stream started (the status is already 200)."""
    return sse(json.dumps(error_body(error, request_id)))


class CompletionStream:
    """Renders one request's chunks as OpenAI stream events: per choice its role first, its text, its
    finish; after the last choice finished, usage (if asked)."""

    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1,
                 tools: list[dict] | None = None) -> None:
        """`tools`: the function definitions whose calls are parsed out of the answer (None: no parsing)."""
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.created = int(time.time())
        self._sent_role: set[int] = set()
        self._unfinished = n
        self._usage: Usage | None = None
        self._parsers = {index: ToolCallParser(tools) for index in range(n)} if tools is not None else {}

    def events(self, chunk: Chunk) -> list[str]:
        """SSE lines for one chunk; a final chunk adds its choice's finish_reason, the last one usage."""
        events = []
        logprobs = ChoiceLogprobs.of(chunk.logprobs) if chunk.logprobs else None
        content, calls = self._split(chunk)
        if chunk.reasoning or content or calls or logprobs or chunk.index not in self._sent_role:
            delta = DeltaMessage(content=content or None, reasoning_content=chunk.reasoning or None,
                                 tool_calls=_delta_calls(calls) or None)
            if chunk.index not in self._sent_role:
                delta.role, delta.content = "assistant", content
                self._sent_role.add(chunk.index)
            events.append(self._event([StreamChoice(index=chunk.index, delta=delta, logprobs=logprobs)]))
        if chunk.finish_reason:
            parser = self._parsers.get(chunk.index)
            finish = _finish_reason(chunk.finish_reason, parser.calls if parser else 0)
            events.append(self._event([StreamChoice(index=chunk.index, delta=DeltaMessage(), finish_reason=finish)]))
            self._usage = _add_usage(self._usage, chunk.usage)
            self._unfinished -= 1
            if self.include_usage and self._usage and not self._unfinished:
                events.append(self._event([], usage=UsageInfo.of(self._usage)))
        return events

    def _split(self, chunk: Chunk) -> tuple[str, list[ToolCallDelta]]:
        """The chunk's answer text as content and tool-call deltas (all content when calls are not parsed)."""
        parser = self._parsers.get(chunk.index)
        if parser is None:
            return chunk.content, []
        content, calls = parser.feed(chunk.content)
        if chunk.finish_reason:
            tail, more = parser.flush()
            content, calls = content + tail, calls + more
        return content, calls

    def _event(self, choices: list[StreamChoice], usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                    usage=usage)
        return sse(chunk.model_dump_json(exclude_none=True))


async def collect(chunks: AsyncIterator[Chunk], request_id: str, model: str, n: int = 1,
                  tools: list[dict] | None = None) -> ChatCompletion:
    """Drain a stream (of n choices) into one non-streaming response; with `tools`, calls parsed out."""
    by_index: dict[int, list[Chunk]] = {index: [] for index in range(n)}
    async for chunk in chunks:
        by_index[chunk.index].append(chunk)
    choices, usage = [], None
    for index, parts in by_index.items():
        if not parts or parts[-1].finish_reason is None or parts[-1].usage is None:
            raise ServiceError("The model stream ended without a final chunk")
        usage = _add_usage(usage, parts[-1].usage)
        content, calls = "".join(p.content for p in parts), []
        if tools is not None:
            content, calls = parse_tool_calls(content, tools)
        message = ResponseMessage(
            content=content if content or not calls else None, reasoning_content="".join(p.reasoning for p in parts) or None,
            tool_calls=[ResponseToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                        for c in calls] or None,
        )
        logprobs = [entry for p in parts for entry in p.logprobs] if parts[0].logprobs is not None else None
        choices.append(Choice(index=index, message=message, finish_reason=_finish_reason(parts[-1].finish_reason, len(calls)),
                              logprobs=ChoiceLogprobs.of(logprobs) if logprobs is not None else None))
    return ChatCompletion(id=request_id, created=int(time.time()), model=model, choices=choices,
                          usage=UsageInfo.of(usage))


def _finish_reason(reason: FinishReason, calls: int) -> FinishReason:
    """An answer that ended by itself after calling tools finishes with "tool_calls", as OpenAI's do."""
    return "tool_calls" if calls and reason == "stop" else reason


def _delta_calls(calls: list[ToolCallDelta]) -> list[DeltaToolCall]:
    """One delta per call in an event: the pieces of a call that arrived together are joined."""
    merged: list[DeltaToolCall] = []
    for call in calls:
        if merged and merged[-1].index == call.index:
            merged[-1].function.arguments += call.arguments
            continue
        merged.append(DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                                    function=DeltaFunction(name=call.name, arguments=call.arguments)))
    return merged


def _add_usage(total: Usage | None, usage: Usage | None) -> Usage | None:
    """The n choices of a request share its prompt: prompt tokens count once, completion tokens add up."""
    if total is None or usage is None:
        return total or usage
    return Usage(total.prompt_tokens, total.completion_tokens + usage.completion_tokens)
