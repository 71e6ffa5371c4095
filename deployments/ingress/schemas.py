"""The OpenAI chat-completions wire format: requests in, responses and stream chunks out."""

from __future__ import annotations

import time
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.common.errors import BadRequestError, UnsupportedParameterError
from deployments.common.types import FinishReason, TokenLogprob, Usage


MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 64
MAX_N = 128
MAX_TOOLS = 128
MAX_SCHEMA_DEPTH = 64
MAX_TOOL_CALLS = 128  # per assistant message: each is rendered into the prompt
FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"  # a tool's name, in its definition and in the calls sent back


class _Strict(BaseModel):
    # Unknown fields are refused (400), never silently ignored; types are not coerced (`false` is not
    # a number, `0.0` not a boolean, `"5"` not an integer).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str = Field(description="A data: URL (base64), an http(s) URL, or a path under the media directory.")
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="Accepted and ignored.")


class VideoURL(MediaURL):
    fps: float | None = Field(default=None, gt=0, description="Frames sampled per second (up to the server cap).")
    max_frames: int | None = Field(default=None, ge=1, description="Most frames sampled (up to the server cap).")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


MessagePart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(description="The call's arguments: a JSON object, as a string.")


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[MessagePart] | None = None
    name: str | None = None
    # The chat template renders an assistant turn's reasoning again only after the last user query
    # (an agent's tool loop); earlier reasoning is dropped.
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS,
                                                     description="An assistant turn's tool calls.")
    tool_call_id: str | None = Field(default=None, description="A tool turn: the call it answers.")

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not isinstance(self.content, str) and any(
                not isinstance(part, TextPart) for part in self.content or []):
            raise ValueError("a tool message's content must be text")
        return self


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON schema (an object).")
    strict: bool | None = Field(default=None, description="Accepted; forced calls are always schema-valid.")

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        properties, required = value.get("properties", {}), value.get("required", [])
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise ValueError("'properties' must map each parameter name to its schema (an object)")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("'required' must be a list of parameter names")
        return _shallow_enough(value)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    _shallow = field_validator("schema_")(lambda cls, value: _shallow_enough(value))


class ResponseFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class MMProcessorKwargs(_Strict):
    downsample_mode: Literal["16x", "4x"] | None = Field(
        default=None, description="Vision tokens per image: 16x merges (the default) or 4x (4 times more tokens, "
        "finer detail, slower).")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# Parameters of the OpenAI API this service does not implement: refused with a 400 naming them
# unless sent with their neutral value.
_UNSUPPORTED = {
    "functions": None, "function_call": None, "logit_bias": None,
    "audio": None, "modalities": None, "prediction": None, "web_search_options": None,
}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(default=None, description="A served name or alias (instruct / thinking).")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1,
                              description="0 = off (vLLM extension); values past the vocabulary mean all of it.")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="64-bit seed (signed or unsigned).")
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="Sequences to generate from the prompt (one prefill); "
                   "at most the model's max_batch_size.")
    logprobs: bool = Field(default=False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20,
                                     description="With logprobs: also the most likely alternatives at each position.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS, description="Token ids that end the sequence like eos "
        "(vLLM extension); their text is not returned.")
    mm_processor_kwargs: MMProcessorKwargs | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none: no calls; auto (default with tools): the model decides; required or a "
        "named function: a call is enforced while decoding.")
    parallel_tool_calls: bool = Field(default=True, description="Whether an enforced answer may hold several calls.")
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object / json_schema: the answer is enforced while decoding.")
    min_tokens: int = Field(default=0, ge=0, description="Suppress end-of-sequence for this many tokens.")
    chat_template_kwargs: ChatTemplateKwargs | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: object) -> object:
        """Refuse lone UTF-16 surrogates (JSON escapes like \\ud800) anywhere, keys included: they are not
        text, cannot be encoded for the tokenizer, and would break any response that echoed them."""
        where = _surrogate_path(data, "")
        if where is not None:
            raise ValueError(f"{where or 'body'} contains a lone UTF-16 surrogate, which is not valid text")
        return data

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            # Each generated token is matched against every stop string's prefixes.
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stops

    def check_supported(self) -> None:
        """Raise UnsupportedParameterError for a parameter this service would otherwise ignore."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name not in _UNSUPPORTED:
                raise UnsupportedParameterError(f"Unrecognized request argument supplied: {name}", param=name)
            if value not in (None, _UNSUPPORTED[name]):
                raise UnsupportedParameterError(f"'{name}' is not supported by this server", param=name)
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameterError("top_logprobs requires logprobs to be true", param="top_logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise UnsupportedParameterError(
                    f"'{name}' is not supported; use repetition_penalty instead", param=name
                )
        self._check_tools()

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise BadRequestError("tools: function names must be unique", param="tools")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise BadRequestError("tool_choice requires tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise BadRequestError(f"tool_choice names '{choice.function.name}', which is not among the tools",
                                  param="tool_choice")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and self.response_format and self.response_format.type != "text":
            raise BadRequestError("response_format cannot be combined with a required tool call",
                                  param="response_format")
        for i, message in enumerate(self.messages):
            for call in message.tool_calls or []:
                try:
                    arguments = _shallow_enough(json.loads(call.function.arguments))
                except (ValueError, RecursionError):  # not JSON, or nested past what is walked downstream
                    arguments = None
                if not isinstance(arguments, dict):
                    raise BadRequestError(f"messages.{i}: tool call arguments must be a JSON object nested at most "
                                          f"{MAX_SCHEMA_DEPTH} levels", param=f"messages.{i}.tool_calls")

    @property
    def uses_tools(self) -> bool:
        """Whether tools are rendered into the prompt and calls parsed from the answer."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _shallow_enough(value: object) -> object:
    """Refuse JSON nested deeper than MAX_SCHEMA_DEPTH (schemas are walked recursively downstream)."""
    if nested_deeper(value, MAX_SCHEMA_DEPTH):
        raise ValueError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    return value


def nested_deeper(value: object, limit: int) -> bool:
    """Whether JSON `value` nests lists/objects more than `limit` levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _surrogate_path(value: object, path: str) -> str | None:
    """The path of the first string (or key) in `value` holding a lone surrogate, else None. Walked with a stack
    of its own, in document order: a body nested as deep as the JSON parser allows cannot exhaust Python's."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        children = []
        for key, child in pairs:
            if isinstance(key, str) and _surrogate_path(key, "") is not None:
                return where or "body"
            children.append((child, f"{where}.{key}" if where else str(key)))
        stack.extend(reversed(children))
    return None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "openbmb"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, entry: TokenLogprob) -> TokenLogprobInfo:
        return cls(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()),
                   top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in entry.top])


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo]

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        return cls(content=[TokenLogprobInfo.of(entry) for entry in entries])


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: UsageInfo | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo
