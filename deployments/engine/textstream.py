"""Token ids -> text deltas -> (reasoning, answer), incrementally and without Ray or torch.

Three small stages, each fed pieces as they arrive and each holding back only what it must:
- IncrementalDetokenizer: ids to text, never emitting half a UTF-8 character;
- StopMatcher: ends the text at the first stop string, never emitting part of one;
- ReasoningSplitter: routes text inside `<think>...</think>` to reasoning, the rest to the
  answer, even when a tag is split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from deployments.common.text import partial_suffix

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing id sequence into text deltas.

    Decoding each id alone would break multi-byte characters and byte-level BPE spacing, so
    this decodes a short window (the ids since the last emitted boundary) twice and emits the
    difference, waiting while the text ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; return the newly completed text ("" while a character is incomplete)."""
        self._ids.extend(ids)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character, as U+FFFD)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix):]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string (the stop is not emitted)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text safe to emit; sets `stopped` once a stop string is complete."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[: min(hits)]
        keep = partial_suffix(buffer, self._stops)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class ReasoningSplitter:
    """Splits generated text into (reasoning, answer) around `<think>...</think>`.

    `in_reasoning`: the prompt already opened a think block (the thinking template does).
    `may_open`: thinking is on but the prompt left the assistant turn open, so the model
    itself may start with `<think>`. With neither, all text is answer.
    Leading whitespace of each section is dropped, as the tags are followed by newlines; an
    answer that no tag precedes is the model's text as decoded, its leading space included.
    """

    def __init__(self, in_reasoning: bool, may_open: bool) -> None:
        self._state = "reasoning" if in_reasoning else ("detect" if may_open else "answer")
        self._held = ""
        self._at_section_start = self._state != "answer"

    def feed(self, text: str) -> tuple[str, str]:
        """Return (reasoning, answer) text that is safe to emit now."""
        buffer, self._held = self._held + text, ""
        reasoning, answer = "", ""
        while buffer:
            if self._state == "detect":
                stripped = buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    buffer, self._state, self._at_section_start = stripped[len(THINK_OPEN):], "reasoning", True
                elif THINK_OPEN.startswith(stripped):
                    self._held, buffer = buffer, ""
                else:
                    self._state, self._at_section_start = "answer", False
            elif self._state == "reasoning":
                end = buffer.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self._section(buffer[:end])
                    buffer, self._state, self._at_section_start = buffer[end + len(THINK_CLOSE):], "answer", True
                else:
                    keep = partial_suffix(buffer, [THINK_CLOSE])
                    reasoning += self._section(buffer[: len(buffer) - keep])
                    self._held, buffer = buffer[len(buffer) - keep:], ""
            else:
                answer += self._section(buffer)
                buffer = ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """End of stream: a held partial tag is plain text of the current section."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return self._section(held), ""
        if self._state == "detect":
            self._at_section_start = False
        return "", self._section(held)

    def _section(self, text: str) -> str:
        if self._at_section_start:
            text = text.lstrip()
            self._at_section_start = not text
        return text
