"""Parsing the model's tool-call format into OpenAI tool calls, whole and streamed piece by piece."""

from __future__ import annotations

import json

import pytest

from deployments.ingress.tools import ToolCallParser, assemble, parse_tool_calls, typed_value

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array", "items": {"type": "integer"}}, "unit": {"enum": ["C", "F"]},
}}}
TOOLS = [WEATHER, {"name": "ping", "parameters": {"type": "object", "properties": {}}}]

ANSWER = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
          "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
          "<parameter=hours>\n[9, 17]\n</parameter>\n<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n"
          "<tool_call>\n<function=ping>\n</function>\n</tool_call>")


def test_a_whole_answer_gives_its_content_and_typed_calls():
    content, calls = parse_tool_calls(ANSWER, TOOLS)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "ping"]
    assert json.loads(calls[0].arguments) == {"city": "San Francisco", "days": 3, "metric": True, "hours": [9, 17],
                                              "unit": "C"}
    assert json.loads(calls[1].arguments) == {}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize("step", [1, 2, 3, 7, 50])
def test_streaming_in_any_split_gives_the_same_calls_with_arguments_arriving_per_parameter(step):
    parser = ToolCallParser(TOOLS)
    content, deltas = "", []
    for i in range(0, len(ANSWER), step):
        text, more = parser.feed(ANSWER[i : i + step])
        content += text
        deltas += more
    tail, more = parser.flush()
    calls = assemble(deltas + more)

    assert content + tail == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(c.name, json.loads(c.arguments))
                                                                  for c in parse_tool_calls(ANSWER, TOOLS)[1]]
    first_call = [d for d in deltas if d.index == 0]
    assert first_call[0].name == "get_weather" and first_call[0].arguments == "" and first_call[0].id
    assert len(first_call) == 1 + 5 + 1, "header, one piece per parameter, closing brace"
    assert all(d.id is None and d.name is None for d in first_call[1:])


def test_text_without_calls_is_all_content_even_when_it_looks_like_the_start_of_a_tag():
    parser = ToolCallParser(TOOLS)
    shown = [parser.feed(piece)[0] for piece in ("a <tool", "_ca", "t> b", " <tool_c")]
    tail, deltas = parser.flush()
    assert "".join(shown) + tail == "a <tool_cat> b <tool_c" and deltas == []


def test_an_opened_call_without_a_function_header_comes_back_as_text():
    content, calls = parse_tool_calls("x <tool_call> no header", TOOLS)
    assert content == "x <tool_call> no header" and calls == []


def test_a_call_cut_short_keeps_what_was_complete():
    content, calls = parse_tool_calls("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", TOOLS)
    assert content == "" and [c.name for c in calls] == ["get_weather"] and calls[0].arguments == ""


def test_text_after_the_calls_is_content():
    content, calls = parse_tool_calls("<tool_call>\n<function=ping>\n</function>\n</tool_call>\nDone.", TOOLS)
    assert content == "Done." and len(calls) == 1


@pytest.mark.parametrize("raw, schema, value", [
    ("42", {"type": "integer"}, 42), ("4.5", {"type": "number"}, 4.5), ("false", {"type": "boolean"}, False),
    ("42", {"type": "string"}, "42"), ("not json", {"type": "integer"}, "not json"),
    ('{"a": 1}', {"type": "object"}, {"a": 1}), ("null", {"type": ["string", "null"]}, None),
    ("7", None, 7), ("plain words", None, "plain words"), ("F", {"enum": ["C", "F"]}, "F"),
    ("1.5", {"type": "integer"}, "1.5"),
])
def test_values_are_typed_by_their_schema(raw, schema, value):
    assert typed_value(raw, schema) == value
