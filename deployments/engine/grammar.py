"""Constrained decoding: what a row may sample next, from a grammar, per row inside the running batch.

A `Constraint` (JSON object, JSON schema, or tool calls in the model's format) becomes an llguidance
grammar; each constrained row gets its own matcher (a copy of one compiled per grammar and cached).
Each decode step, only the constrained rows have their logits masked to the tokens their grammar
allows next; the other rows of the batch are untouched. JSON is compact (no free whitespace between
tokens), so an answer whose values come from finite sets ends within a bounded number of tokens
whatever the weights prefer. Once a grammar is complete only end-of-sequence remains allowed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from deployments.common.errors import InvalidGrammarError
from deployments.common.toolformat import (
    CALL_CLOSE, CALL_OPEN, FUNCTION_CLOSE, FUNCTION_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN,
)
from deployments.common.types import Constraint

COMPACT = {"whitespace_flexible": False}
_NL = "\n"


def grammar_text(constraint: Constraint, after_reasoning: bool) -> str:
    """The llguidance (lark) grammar of a constraint. `after_reasoning`: the answer follows `</think>`, which
    the template and the model write as `</think>` + a blank line."""
    if constraint.kind == "tool_calls":
        body, rules = _tool_calls(list(constraint.tools), constraint.parallel)
    else:
        schema = constraint.schema if constraint.kind == "json_schema" else {"type": "object"}
        body, rules = f"%json {json.dumps(_compact(schema))}", []
    prefix = json.dumps(_NL * 2) + " " if after_reasoning else ""
    return llguidance.LLMatcher.grammar_from_lark("\n".join(["%llguidance {}", f"start: {prefix}{body}", *rules]))


def _compact(schema: object) -> dict:
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    return {**schema, "x-guidance": COMPACT}


def _tool_calls(tools: list[dict], parallel: bool) -> tuple[str, list[str]]:
    """Calls as the model writes them (deployments.common.toolformat): a function among `tools`, its parameters in
    declared order (required ones always), string values as raw text, string enums as one of their values,
    any other value as compact JSON valid against its schema. Several calls, one per line, if `parallel`."""
    q = json.dumps
    rules, functions = [], []
    for t, tool in enumerate(tools):
        parameters = tool.get("parameters") or {}
        required = set(parameters.get("required") or [])
        parts = []
        for p, (name, schema) in enumerate((parameters.get("properties") or {}).items()):
            rule = f"p{t}_{p}"
            rules.append(f"{rule}: {q(f'{PARAMETER_OPEN}{name}>{_NL}')} {_value(schema)}")
            parts.append(rule if name in required else f"{rule}?")
        rules.append(f"f{t}: {q(tool['name'] + '>' + _NL)} {' '.join(parts)}")
        functions.append(f"f{t}")
    rules += [
        f"call: {q(CALL_OPEN + _NL + FUNCTION_OPEN)} ({' | '.join(functions)}) "
        f"{q(FUNCTION_CLOSE + _NL + CALL_CLOSE)}",
        # lazy: ends at the first newline + close tag ("/" escaped inside lark's /regex/)
        r"raw_value[lazy]: /(.|\n)*\n" + PARAMETER_CLOSE.replace("/", r"\/") + "/",
    ]
    return ("call" + (f" ({q(_NL)} call)*" if parallel else "")), rules


def _value(schema: object) -> str:
    close = json.dumps(f"{_NL}{PARAMETER_CLOSE}{_NL}")
    if not isinstance(schema, dict):
        return f"raw_value {json.dumps(_NL)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return f"({' | '.join(json.dumps(v) for v in enum)}) {close}"
    if schema.get("type") == "string" and "const" not in schema:
        return f"raw_value {json.dumps(_NL)}"
    return f"%json {json.dumps(_compact(schema))} {close}"


class Grammars:
    """One per loaded model: the tokenizer as llguidance sees it, and compiled grammars (LRU)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], cache_size: int = 256) -> None:
        self.vocab_size = vocab_size  # rows of the model's logits; ids past the tokenizer's are never allowed
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matchers(self, constraint: Constraint, after_reasoning: bool, count: int) -> list[llguidance.LLMatcher]:
        """`count` fresh matchers for the constraint. Raises InvalidGrammarError (a 400) for a schema or
        tool definition the grammar engine refuses. Runs off the engine thread (compiling drops the GIL)."""
        try:
            text = grammar_text(constraint, after_reasoning)
        except Exception as exc:  # whatever the client's schema makes the grammar builder raise is its error
            raise InvalidGrammarError(f"Invalid schema: {exc}", param=_param(constraint)) from None
        with self._lock:
            compiled = self._compiled.get(text)
            if compiled is not None:
                self._compiled.move_to_end(text)
        if compiled is None:
            compiled = self._compile(text, constraint)
        return [compiled.deep_copy() for _ in range(count)]

    def _compile(self, text: str, constraint: Constraint) -> llguidance.LLMatcher:
        try:
            error = llguidance.LLMatcher.validate_grammar(text, self._tokenizer)
            matcher = None if error else llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        except Exception as exc:
            error, matcher = str(exc), None
        if matcher is None or matcher.is_error():
            raise InvalidGrammarError(f"Invalid schema: {error or matcher.get_error()}", param=_param(constraint))
        with self._lock:
            self._compiled[text] = matcher
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return matcher


def _param(constraint: Constraint) -> str:
    return "tools" if constraint.kind == "tool_calls" else "response_format"


class Masker:
    """Masks the logits of constrained rows to what their matchers allow (engine thread only)."""

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._bitmask = torch.full((max_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def apply(self, logits: torch.Tensor, matchers: list[tuple[int, llguidance.LLMatcher]]) -> dict[int, str]:
        """In place: row i of `logits` keeps only the tokens its matcher allows (a finished grammar allows
        only end-of-sequence). Returns the rows whose matcher failed, with why: they fail alone."""
        failed = {}
        for index, matcher in matchers:
            try:
                llguidance.torch.fill_next_token_bitmask(matcher, self._bitmask, index)
            except Exception as exc:  # one request's grammar must not end the batch's shared step
                failed[index] = f"{type(exc).__name__}: {exc}"
        words = self._bitmask.numpy()
        for index, _ in matchers:
            if index not in failed:
                _mask_row(logits[index], words[index], self.vocab_size)
        return failed


_BITS = np.arange(32, dtype=np.uint32)


def _set_bits(words: np.ndarray, where: np.ndarray, vocab: int) -> torch.Tensor:
    bits = (words[where].astype(np.uint32)[:, None] >> _BITS) & 1
    word, bit = np.nonzero(bits)
    ids = where[word].astype(np.int64) * 32 + bit
    return torch.from_numpy(ids[ids < vocab])


def _mask_row(row: torch.Tensor, words: np.ndarray, vocab: int) -> None:
    """-inf wherever the row's bit is 0 (bit j of word w is token 32w + j), touching as little as it can."""
    nonzero = np.flatnonzero(words)
    if len(nonzero) * 4 <= len(words):  # few tokens allowed: blank the row, put them back
        allowed = _set_bits(words, nonzero, vocab)
        kept = row.index_select(0, allowed)
        row.fill_(-torch.inf).index_copy_(0, allowed, kept)
        return
    partial = np.flatnonzero(words != -1)
    if len(partial) * 4 <= len(words):  # few tokens refused
        if len(partial):
            row.index_fill_(0, _set_bits(~words, partial, vocab), -torch.inf)
    else:
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: min(vocab, row.shape[0])]
        row[: len(allowed)].masked_fill_(torch.from_numpy(allowed) == 0, -torch.inf)
    if row.shape[0] > vocab:
        row[vocab:] = -torch.inf
