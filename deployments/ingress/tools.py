"""Tool calls in MiniCPM-V 4.6's format (`deployments.common.toolformat`) -> OpenAI `tool_calls`, whole or
as stream deltas.

`ToolCallParser` is fed the answer text as it streams and splits it into plain content and tool-call
deltas: a call's id and name as soon as its `<function=...>` header is complete, then its JSON
arguments one parameter at a time, each value typed by the tool's JSON schema. Pure Python: the
router runs it, with no model in reach.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from deployments.common.text import partial_suffix
from deployments.ingress.schemas import MAX_SCHEMA_DEPTH, nested_deeper
from deployments.common.toolformat import (
    CALL_CLOSE, CALL_OPEN, FUNCTION_CLOSE, FUNCTION_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN,
)

_FUNCTION = re.compile(rf"\s*{re.escape(FUNCTION_OPEN)}([^>\n]+)>\n?")
_PARAMETER = re.compile(rf"\s*{re.escape(PARAMETER_OPEN)}([^>\n]+)>\n?(.*?)\n?{re.escape(PARAMETER_CLOSE)}", re.S)


@dataclass
class ToolCallDelta:
    """A piece of tool call `index`: its id and name (first piece only) and/or a fragment of its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits streamed answer text into content and tool-call deltas (see the module docstring)."""

    def __init__(self, tools: list[dict]) -> None:
        """`tools`: OpenAI function definitions ({"name", "parameters", ...}); their schemas type the values."""
        self._properties = {t["name"]: (t.get("parameters") or {}).get("properties") or {} for t in tools}
        self._buffer = ""
        self._held_space = ""  # whitespace at the end of content: dropped if a call follows it
        self._space_before_call = ""
        self._state = "content"  # content -> header -> parameters -> closing -> content
        self._calls = 0
        self._function: str | None = None
        self._parameters = 0

    @property
    def calls(self) -> int:
        """Tool calls started so far."""
        return self._calls

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content to show and tool-call deltas, for text that extends the answer."""
        self._buffer += text
        content, deltas = [], []
        while True:
            step = getattr(self, f"_in_{self._state}")()
            if step is None:
                break
            content.append(step[0])
            deltas.extend(step[1])
        return "".join(content), deltas

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left at the end: held text becomes content; a call cut short stays as it is."""
        if self._state == "content" or (self._state == "header" and not self._calls):
            leftover = (self._space_before_call + CALL_OPEN if self._state == "header" else "") + self._buffer
            text, self._buffer = self._held_space + leftover if leftover.strip() else "", ""
            self._held_space = ""
            return text, []
        self._buffer = ""
        return "", []

    # ---- one step per state: (content, deltas) when progress was made, None when more text is needed

    def _in_content(self) -> tuple[str, list[ToolCallDelta]] | None:
        start = self._buffer.find(CALL_OPEN)
        if start < 0:
            keep = partial_suffix(self._buffer, [CALL_OPEN])
            text, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
            return (self._emit(text), []) if text else None
        text, self._buffer = self._buffer[:start], self._buffer[start + len(CALL_OPEN):]
        shown = self._emit(text)
        # The whitespace before a call is dropped, unless the call turns out not to be one.
        self._space_before_call, self._held_space, self._state = self._held_space, "", "header"
        return shown, []

    def _emit(self, text: str) -> str:
        """Content text, holding back trailing whitespace until more text shows it is not before a call."""
        text = self._held_space + text
        stripped = text.rstrip()
        self._held_space = text[len(stripped):]
        return stripped

    def _in_header(self) -> tuple[str, list[ToolCallDelta]] | None:
        match = _FUNCTION.match(self._buffer)
        if match is None:
            return None
        self._buffer = self._buffer[match.end():]
        self._function, self._parameters, self._state = match.group(1).strip(), 0, "parameters"
        self._calls += 1
        return "", [ToolCallDelta(self._calls - 1, "", id=new_call_id(), name=self._function)]

    def _in_parameters(self) -> tuple[str, list[ToolCallDelta]] | None:
        stripped = self._buffer.lstrip()
        if stripped.startswith(FUNCTION_CLOSE):
            self._buffer = stripped[len(FUNCTION_CLOSE):]
            self._state = "closing"
            return "", [ToolCallDelta(self._calls - 1, "}" if self._parameters else "{}")]
        match = _PARAMETER.match(self._buffer)
        if match is None:
            return None
        self._buffer = self._buffer[match.end():]
        name = match.group(1).strip()
        schema = self._properties.get(self._function or "", {}).get(name)
        fragment = f"{json.dumps(name)}: {json.dumps(typed_value(match.group(2), schema), ensure_ascii=False)}"
        self._parameters += 1
        return "", [ToolCallDelta(self._calls - 1, ("{" if self._parameters == 1 else ", ") + fragment)]

    def _in_closing(self) -> tuple[str, list[ToolCallDelta]] | None:
        stripped = self._buffer.lstrip()
        if not stripped.startswith(CALL_CLOSE):
            return None if CALL_CLOSE.startswith(stripped) else self._leave_call()
        self._buffer, self._state = stripped[len(CALL_CLOSE):].lstrip(), "content"
        return "", []

    def _leave_call(self) -> tuple[str, list[ToolCallDelta]]:
        self._state = "content"  # text after </function> that does not close the call: back to content
        return "", []


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str, list[ParsedCall]]:
    """A whole answer's content (None-worthy when empty) and its complete tool calls."""
    parser = ToolCallParser(tools)
    content, deltas = parser.feed(text)
    tail, more = parser.flush()
    return content + tail, assemble(deltas + more)


def assemble(deltas: list[ToolCallDelta]) -> list[ParsedCall]:
    """Deltas joined into calls (a call whose arguments were cut short keeps its partial JSON)."""
    calls: dict[int, ParsedCall] = {}
    for delta in deltas:
        if delta.index not in calls:
            calls[delta.index] = ParsedCall(delta.id or new_call_id(), delta.name or "", "")
        calls[delta.index].arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


def typed_value(raw: str, schema: dict | None) -> object:
    """A parameter's text as the JSON value its schema asks for; text that does not parse stays a string."""
    kinds = _types(schema)
    if kinds == {"string"}:
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
        return raw
    if nested_deeper(value, MAX_SCHEMA_DEPTH):  # the client gets it as text: re-encoding it would recurse as deep
        return raw
    if not kinds or _matches(value, kinds):
        return value
    return raw


def _types(schema: dict | None) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return {"string"}
    return set()


def _matches(value: object, kinds: set[str]) -> bool:
    checks = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
              "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str)}
    return any(checks.get(kind, lambda v: False)(value) for kind in kinds)

