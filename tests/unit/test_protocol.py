"""OpenAI request -> generation request, variant choice, and chunk -> OpenAI event rendering."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments.common.config import ModelConfig, RouterArgs
from deployments.common.errors import BadRequestError, ModelNotFoundError, UnsupportedParameterError
from deployments.ingress.protocol import CompletionStream, choose_variant, collect, to_generation_request
from deployments.ingress.schemas import ChatCompletionRequest
from deployments.common.types import Chunk, Usage

BOTH = {v: ModelConfig(variant=v) for v in ("instruct", "thinking")}
ONLY_INSTRUCT = {"instruct": ModelConfig(variant="instruct")}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


async def no_media(part):
    raise AssertionError("no media expected")


@pytest.mark.parametrize("fields, variant, thinking", [
    ({}, "instruct", False),
    ({"model": "MiniCPM-V-4.6"}, "instruct", False),
    ({"model": "instruct"}, "instruct", False),
    ({"model": "MiniCPM-V-4.6-Thinking"}, "thinking", True),
    ({"model": "thinking"}, "thinking", True),
    ({"model": "MiniCPM-V-4.6", "chat_template_kwargs": {"enable_thinking": True}}, "thinking", True),
    ({"model": "thinking", "chat_template_kwargs": {"enable_thinking": False}}, "instruct", False),
])
def test_one_boolean_picks_deployment_and_enable_thinking(fields, variant, thinking):
    config, enable_thinking = choose_variant(request(**fields), BOTH)
    assert (config.variant, enable_thinking) == (variant, thinking)


@pytest.mark.parametrize("model, thinking", [("MiniCPM-V-4.6-Thinking", True), ("MiniCPM-V-4.6", False)])
def test_single_variant_serves_both_names_and_only_flips_enable_thinking(model, thinking):
    config, enable_thinking = choose_variant(request(model=model), ONLY_INSTRUCT)
    assert config.variant == "instruct" and enable_thinking is thinking


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ModelNotFoundError, match="MiniCPM-V-4.6-Thinking"):
        choose_variant(request(model="gpt-4o"), BOTH)


async def test_conversion_maps_roles_text_and_sampling():
    req = request(messages=[{"role": "developer", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                  max_completion_tokens=7, temperature=0.5, top_k=3, seed=9, stop="END")
    gen = await to_generation_request(req, True, "rid", RouterArgs(default_max_tokens=100), no_media)
    assert [(m.role, m.content) for m in gen.messages] == [("system", ["be brief"]), ("user", ["a", "b"])]
    assert (gen.sampling.max_tokens, gen.sampling.temperature, gen.sampling.top_k) == (7, 0.5, 3)
    assert gen.sampling.stop == ["END"] and gen.sampling.seed == 9
    assert gen.enable_thinking and gen.request_id == "rid"


async def test_default_max_tokens_applies_when_none_sent():
    assert (await to_generation_request(request(), False, "r", RouterArgs(default_max_tokens=123), no_media)).sampling.max_tokens == 123


@pytest.mark.parametrize("fields, param", [
    ({"top_logprobs": 3}, "top_logprobs"), ({"functions": [{"name": "f"}]}, "functions"), ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"whatever": 1}, "whatever"),
])
async def test_unsupported_parameters_are_refused_by_name(fields, param):
    with pytest.raises(UnsupportedParameterError) as info:
        await to_generation_request(request(**fields), False, "r", RouterArgs(default_max_tokens=10), no_media)
    assert info.value.param == param


async def test_neutral_values_of_unsupported_parameters_are_accepted_and_change_nothing():
    neutral = request(logprobs=False, tools=None, presence_penalty=0, frequency_penalty=0, logit_bias=None,
                      functions=None)
    args = RouterArgs(default_max_tokens=10)
    assert await to_generation_request(neutral, False, "r", args, no_media) == \
        await to_generation_request(request(), False, "r", args, no_media)


async def test_last_message_from_assistant_and_min_over_max_are_refused():
    with pytest.raises(BadRequestError, match="assistant"):
        await to_generation_request(request(messages=[{"role": "assistant", "content": "x"}]), False, "r", RouterArgs(default_max_tokens=5), no_media)
    with pytest.raises(BadRequestError, match="min_tokens"):
        await to_generation_request(request(max_tokens=2, min_tokens=3), False, "r", RouterArgs(default_max_tokens=5), no_media)


def test_stream_events_role_first_then_deltas_finish_and_usage():
    stream = CompletionStream("id1", "M", include_usage=True)
    events = [e for c in [Chunk(reasoning="r"), Chunk(content="a"),
                          Chunk(finish_reason="length", usage=Usage(3, 2))] for e in stream.events(c)]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": "r"}
    assert payloads[1]["choices"][0]["delta"] == {"content": "a"}
    assert payloads[2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert payloads[3]["choices"] == [] and payloads[3]["usage"]["total_tokens"] == 5
    assert {p["id"] for p in payloads} == {"id1"} and {p["object"] for p in payloads} == {"chat.completion.chunk"}


def test_stream_without_include_usage_sends_no_usage_chunk():
    events = CompletionStream("i", "M", include_usage=False).events(Chunk(finish_reason="stop", usage=Usage(1, 1)))
    assert all("usage" not in e for e in events)


async def test_collect_joins_reasoning_and_answer_with_usage():
    async def chunks():
        for c in [Chunk(reasoning="th"), Chunk(reasoning="ink"), Chunk(content="ans"),
                  Chunk(finish_reason="stop", usage=Usage(4, 3))]:
            yield c

    completion = await collect(chunks(), "id", "M")
    assert completion.choices[0].message.reasoning_content == "think"
    assert completion.choices[0].message.content == "ans"
    assert completion.choices[0].finish_reason == "stop" and completion.usage.total_tokens == 7


async def test_router_limits_on_messages_and_max_tokens():
    limits = RouterArgs(max_messages=2, max_tokens_cap=50)
    three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(BadRequestError, match="limit is 2") as info:
        await to_generation_request(request(messages=three), False, "r", limits, no_media)
    assert info.value.param == "messages"
    with pytest.raises(BadRequestError, match="at most 50") as info:
        await to_generation_request(request(max_tokens=51), False, "r", limits, no_media)
    assert info.value.param == "max_tokens"
    assert (await to_generation_request(request(max_tokens=50), False, "r", limits, no_media)).sampling.max_tokens == 50


# ---------------------------------------------------------------------------- tools, response formats, n


def tool(name: str = "f", **parameters) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", **parameters}}}


@pytest.mark.parametrize("fields, message", [
    ({"tools": [tool(properties=[])]}, "'properties' must map"),
    ({"tools": [tool(properties={"a": 3})]}, "'properties' must map"),
    ({"tools": [tool(required="a")]}, "'required' must be a list"),
    ({"tools": [tool("bad name!")]}, "pattern"),
    ({"tools": [tool(), tool()]}, "unique"),
    ({"tool_choice": "required"}, "requires tools"),
    ({"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not among the tools"),
    ({"tools": [tool()], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "[1]"}}]}, {"role": "user", "content": "go"}]},
     "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a":' + "[" * 5000 + "]" * 5000 + "}"}}]},
        {"role": "user", "content": "go"}]}, "nested at most"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a":' + "[" * 100 + "]" * 100 + "}"}}]},
        {"role": "user", "content": "go"}]}, "nested at most"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]}, "only assistant messages"),
])
async def test_malformed_tool_requests_are_refused_with_a_reason(fields, message):
    with pytest.raises((BadRequestError, ValueError), match=message):
        await to_generation_request(request(**fields), False, "r", RouterArgs(default_max_tokens=10), no_media)


@pytest.mark.parametrize("fields, kind", [
    ({"tools": [tool()], "tool_choice": "required"}, "tool_calls"),
    ({"tools": [tool(), tool("g")], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_calls"),
    ({"tools": [tool()]}, None),
    ({"tools": [tool()], "tool_choice": "none", "response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "json_schema"),
    ({"response_format": {"type": "text"}}, None),
])
async def test_the_constraint_follows_tool_choice_then_response_format(fields, kind):
    generation = await to_generation_request(request(**fields), False, "r", RouterArgs(default_max_tokens=10),
                                             no_media)
    assert (generation.constraint.kind if generation.constraint else None) == kind
    if fields.get("tool_choice", {}) == {"type": "function", "function": {"name": "g"}}:
        assert [t["name"] for t in generation.constraint.tools] == ["g"]
    assert (generation.tools is None) == (fields.get("tool_choice") == "none" or "tools" not in fields)


async def test_a_stream_of_n_choices_with_a_tool_call_and_reasoning_renders_per_choice():
    stream = CompletionStream("id", "m", include_usage=True, n=2, tools=[{"name": "f", "parameters": {}}])
    events = [
        *stream.events(Chunk(reasoning="thinking...", index=1)),
        *stream.events(Chunk(content="<tool_call>\n<function=f>\n</function>\n</tool_call>", index=1)),
        *stream.events(Chunk(content="plain", index=0)),
        *stream.events(Chunk(finish_reason="stop", usage=Usage(5, 3), index=1)),
        *stream.events(Chunk(finish_reason="length", usage=Usage(5, 4), index=0)),
    ]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events]
    deltas = {i: [p["choices"][0] for p in payloads if p["choices"] and p["choices"][0]["index"] == i] for i in (0, 1)}
    assert deltas[1][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": "thinking..."}
    call = deltas[1][1]["delta"]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": "{}"} and call["id"].startswith("call_")
    assert deltas[1][-1]["finish_reason"] == "tool_calls" and deltas[0][-1]["finish_reason"] == "length"
    assert deltas[0][0]["delta"] == {"role": "assistant", "content": "plain"}
    assert payloads[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert sum(1 for p in payloads if "usage" in p) == 1


def assistant_call(name: str = "get_weather", call_id: str = "call_1", arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def with_calls(*calls: dict, **message) -> list[dict]:
    return [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": list(calls), **message},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_a_tool_call_sent_back_must_have_a_tool_name_and_their_number_is_capped():
    with pytest.raises(ValidationError, match="name"):
        request(messages=with_calls(assistant_call(name="x" * 5_000_000)))
    with pytest.raises(ValidationError, match="name"):
        request(messages=with_calls(assistant_call(name="two words")))
    with pytest.raises(ValidationError, match="128"):
        request(messages=with_calls(*[assistant_call(call_id=f"call_{i}") for i in range(129)]))
    request(messages=with_calls(*[assistant_call(call_id=f"call_{i}") for i in range(128)]))


@pytest.mark.parametrize("where", ["call id", "tool_call_id", "name"])
async def test_every_client_string_counts_toward_max_text_chars(where):
    big = "x" * 2000
    messages = with_calls(assistant_call(call_id=big if where == "call id" else "call_1"))
    if where == "tool_call_id":
        messages[2]["tool_call_id"] = big
    if where == "name":
        messages[0]["name"] = big
    limits = RouterArgs(max_text_chars=1000)
    with pytest.raises(BadRequestError, match="characters of text; the limit is 1000"):
        await to_generation_request(request(messages=messages), False, "r", limits, no_media)
    await to_generation_request(request(messages=with_calls(assistant_call())), False, "r", limits, no_media)
