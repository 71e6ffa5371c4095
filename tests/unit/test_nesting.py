"""Bodies and generated tool arguments nested as deep as a JSON parser allows get a 400 or stay text: no check
walks them with Python's own recursion (which a router thread's stack ends a little before the parser's limit)."""

from __future__ import annotations

import json
import sys

import pytest
from pydantic import ValidationError

from deployments.ingress.schemas import ChatCompletionRequest, nested_deeper
from deployments.ingress.tools import typed_value

DEEP = sys.getrecursionlimit() * 3  # past what any recursive walk could take


def nested(depth: int, kind: str, leaf: object = "x") -> object:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_body_nested_past_the_recursion_limit_is_refused_by_validation_not_a_recursion_error(kind):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": nested(DEEP, kind)}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_a_lone_surrogate_deep_in_a_body_is_still_found():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "metadata": nested(DEEP, "object", leaf=json.loads('"\\ud800"'))}
    with pytest.raises(ValidationError, match="lone UTF-16 surrogate"):
        ChatCompletionRequest.model_validate(body)


def test_a_generated_argument_nested_deeper_than_the_schema_limit_stays_text_and_encodes():
    raw = "[" * 990 + "]" * 990
    value = typed_value(raw, {"type": "array"})
    assert value == raw and json.loads(json.dumps(value)) == raw
    assert typed_value("[[1], [2]]", {"type": "array"}) == [[1], [2]]
    assert typed_value("[" * 5000, {"type": "array"}) == "[" * 5000


def test_nested_deeper_counts_levels_of_lists_and_objects():
    assert not nested_deeper(nested(64, "list"), 64) and nested_deeper(nested(65, "object"), 64)
    assert not nested_deeper("text", 0)
