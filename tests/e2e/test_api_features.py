"""Tools, structured output, logprobs and n through the running service, with the official OpenAI SDK.

The tiny checkpoints have random weights: every structured answer checked here is valid because decoding
enforces it, which is what these tests prove.
"""

from __future__ import annotations

import base64
import io
import json

import jsonschema
import openai
import pytest
from PIL import Image

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "with_wind": {"type": "boolean"},
    }, "required": ["city", "unit"]},
}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "JST"]}},
                                       "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = {"type": "object", "properties": {
    "mood": {"enum": ["calm", "stormy"]}, "sunny": {"type": "boolean"},
    "scores": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
}, "required": ["mood", "sunny", "scores"], "additionalProperties": False}


@pytest.fixture(scope="module")
def sdk(serve_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def test_a_tool_round_trip_call_result_answer(sdk):
    first = sdk.chat.completions.create(model="instruct", messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=200, temperature=1.0, seed=3)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"

    history = [*ASK, choice.message,  # the SDK's own message object, sent back as clients do
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, light rain"}]
    answer = sdk.chat.completions.create(model="instruct", messages=history, tools=TOOLS, max_tokens=8,
                                         extra_body={"min_tokens": 8})
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens, "the call and its result are in the prompt"


def test_a_named_tool_choice_calls_that_function_with_valid_arguments(sdk):
    completion = sdk.chat.completions.create(
        model="instruct", messages=ASK, tools=TOOLS, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_time"])


def test_streamed_tool_calls_assemble_into_valid_json_arriving_in_pieces(sdk):
    stream = sdk.chat.completions.create(model="instruct", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert pieces[0].id and pieces[0].function.name == "get_weather" and pieces[0].type == "function"
    assert len([p for p in pieces if p.function.arguments]) >= 2, "arguments arrive in pieces, not at the end"
    arguments = "".join(p.function.arguments or "" for p in pieces)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_weather"])


def test_tool_choice_none_and_auto_answer_with_text(sdk):
    no_tools = sdk.chat.completions.create(model="instruct", messages=ASK, max_tokens=1).usage.prompt_tokens
    prompts = {}
    for choice in ("none", "auto"):
        completion = sdk.chat.completions.create(model="instruct", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                 max_tokens=6, extra_body={"min_tokens": 6})
        assert completion.choices[0].finish_reason == "length" and completion.choices[0].message.content
        assert completion.choices[0].message.tool_calls is None
        prompts[choice] = completion.usage.prompt_tokens
    assert prompts["none"] == no_tools, "none: the tools are not rendered into the prompt"
    assert prompts["auto"] > no_tools, "auto: the model is shown the tools"


# An answer whose text is a complete call in the model's format, whatever the weights: a JSON schema whose
# only string is that text (constrained decoding writes it).
CALL_TEXT = "<tool_call><function=get_time><parameter=zone>UTC</parameter></function></tool_call>"
SAYS_A_CALL = {"type": "json_schema", "json_schema": {"name": "says", "strict": True, "schema": {
    "type": "object", "properties": {"say": {"enum": [CALL_TEXT]}}, "required": ["say"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_parses_a_call_out_of_the_text_and_none_leaves_it_text(sdk, stream):
    def ask(choice: str) -> tuple[str, list, str]:
        response = sdk.chat.completions.create(model="instruct", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               response_format=SAYS_A_CALL, max_tokens=120, temperature=0,
                                               stream=stream)
        if not stream:
            message = response.choices[0].message
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
            return message.content or "", calls, response.choices[0].finish_reason
        content, pieces, finish = "", [], None
        for chunk in response:
            for choice_ in chunk.choices:
                content += choice_.delta.content or ""
                pieces += choice_.delta.tool_calls or []
                finish = choice_.finish_reason or finish
        calls = [(p.function.name, json.loads("".join(q.function.arguments or "" for q in pieces)))
                 for p in pieces if p.function.name]
        return content, calls, finish

    content, calls, finish = ask("none")
    assert json.loads(content) == {"say": CALL_TEXT}, "none: the text stays as the model wrote it"
    assert calls == [] and finish == "stop"
    content, calls, finish = ask("auto")
    assert calls == [("get_time", {"zone": "UTC"})] and finish == "tool_calls", "auto: the call is parsed out"
    assert "<tool_call>" not in content and "UTC" not in content


def test_thinking_with_a_required_tool_reasons_first_then_the_call_is_enforced(sdk):
    # The grammar starts after the model closes its reasoning; random weights rarely do within 24 tokens,
    # so this proves the reasoning streams unconstrained and the request is served.
    completion = sdk.chat.completions.create(model="thinking", messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=24, extra_body={"min_tokens": 24})
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", None)
    assert completion.usage.completion_tokens == 24


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_answer_validates(sdk, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER, "strict": True}}
    response = sdk.chat.completions.create(model="instruct", messages=ASK, response_format=fmt, max_tokens=120,
                                           temperature=1.0, seed=8, stream=stream)
    if stream:
        chunks = list(response)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        text, finish = response.choices[0].message.content, [response.choices[0].finish_reason]
    jsonschema.validate(json.loads(text), ANSWER)
    assert finish == ["stop"]


def test_a_json_object_answer_is_a_json_object(sdk):
    # A seed whose draws close the object at once (random weights never end a free-text key).
    completion = sdk.chat.completions.create(model="instruct", messages=ASK, max_tokens=30, temperature=1.0, seed=1,
                                             response_format={"type": "json_object"})
    assert json.loads(completion.choices[0].message.content) == {}
    assert completion.choices[0].finish_reason == "stop"


def test_an_invalid_schema_is_a_400_naming_the_field(sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="instruct", messages=ASK, response_format=fmt, max_tokens=5)
    error = info.value.body
    assert error["code"] == "invalid_schema" and error["param"] == "response_format"


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_cover_every_token_with_the_asked_alternatives(sdk, stream):
    response = sdk.chat.completions.create(model="instruct", messages=ASK, max_tokens=7, logprobs=True,
                                           top_logprobs=4, stream=stream, stream_options={"include_usage": True}
                                           if stream else None, extra_body={"min_tokens": 7})
    if stream:
        chunks = list(response)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        tokens = chunks[-1].usage.completion_tokens
    else:
        entries, tokens = response.choices[0].logprobs.content, response.usage.completion_tokens
    assert len(entries) == tokens == 7
    for entry in entries:
        assert len(entry.top_logprobs) == 4 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert entry.bytes == list(entry.token.encode())


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_come_from_one_request_with_summed_usage(sdk, stream):
    response = sdk.chat.completions.create(
        model="instruct", messages=ASK, n=3, max_tokens=5, temperature=1.0, seed=21, stream=stream,
        stream_options={"include_usage": True} if stream else None, extra_body={"min_tokens": 5},
    )
    if stream:
        chunks = list(response)
        texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(3)}
        usage = chunks[-1].usage
    else:
        texts = {c.index: c.message.content for c in response.choices}
        usage = response.usage
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
    assert usage.completion_tokens == 15


def test_stop_token_ids_end_the_answer_before_that_tokens_text(sdk, tiny_checkpoints):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_checkpoints["instruct"] / "tokenizer.json"))
    greedy = {"model": "instruct", "messages": ASK, "max_tokens": 24, "temperature": 0, "logprobs": True}
    reference = sdk.chat.completions.create(**greedy).choices[0]
    tokens = [entry.token for entry in reference.logprobs.content]
    assert "".join(tokens) == reference.message.content, "precondition: the tokens' texts make the answer"

    def one_id(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == text else None

    # A token whose first occurrence is a few tokens in, with visible text of its own.
    position, stop_id = next((i, one_id(t)) for i, t in enumerate(tokens)
                             if i >= 3 and t.strip() and t not in tokens[:i] and one_id(t) is not None)
    stopped = sdk.chat.completions.create(**greedy, extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == position + 1, "it ended at that token"
    assert stopped.choices[0].message.content == "".join(tokens[:position]), "its text is not returned"


def test_downsample_mode_4x_gives_an_image_about_four_times_the_tokens(sdk):
    buffer = io.BytesIO()
    Image.new("RGB", (448, 448), (20, 120, 220)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def prompt_tokens(with_image: bool, mode: str | None) -> int:
        content = [{"type": "text", "text": "what"}]
        if with_image:
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        extra = {"mm_processor_kwargs": {"downsample_mode": mode}} if mode else {}
        return sdk.chat.completions.create(model="instruct", messages=[{"role": "user", "content": content}],
                                           max_tokens=1, extra_body=extra).usage.prompt_tokens

    text = prompt_tokens(False, None)
    default, finer = prompt_tokens(True, None) - text, prompt_tokens(True, "4x") - text
    assert prompt_tokens(True, "16x") - text == default > 0, "16x is the default"
    # Each slice's patches are divided by 4 instead of 16 (the image's start and end tokens stay).
    assert finer >= 3 * default, (finer, default)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="instruct", messages=ASK, max_tokens=5,
                                    extra_body={"mm_processor_kwargs": {"downsample_mode": "2x"}})


def test_a_schema_nested_too_deep_is_a_400_not_a_crash(sdk):
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="instruct", messages=ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "deep", "schema": schema}})
    assert "nested more than" in info.value.body["message"]
