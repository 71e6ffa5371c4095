"""Grammars for constraints, checked with the preset tokenizer: what they accept and refuse, the mask they
produce, and a row's grammar starting only after its reasoning."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from deployments.common.errors import InvalidGrammarError
from deployments.engine.grammar import Grammars, Masker
from deployments.engine.rows import Row
from deployments.engine.sampling import RowSampling
from deployments.common.types import Constraint

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
TOOL = {"name": "lookup", "parameters": {"type": "object", "properties": {
    "q": {"type": "string"}, "n": {"type": "integer"}, "mode": {"enum": ["fast", "exact"]}}, "required": ["q", "mode"]}}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["instruct"])


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return Grammars(tokenizer, len(tokenizer), eos)


def accepts(grammars: Grammars, tokenizer, constraint: Constraint, text: str, after_reasoning: bool = False) -> bool:
    """Whether the grammar takes `text` token by token and may then end."""
    matcher = grammars.matchers(constraint, after_reasoning, 1)[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


@pytest.mark.parametrize("text, ok", [('{"ok":true}', True), ('{"ok": true}', False), ('{"ok":1}', False),
                                      ('{"ok":false,"x":1}', False), ('{"ok":false}', True)])
def test_a_json_schema_grammar_takes_exactly_the_compact_valid_answers(grammars, tokenizer, text, ok):
    assert accepts(grammars, tokenizer, Constraint("json_schema", schema=SCHEMA), text) is ok


def test_after_reasoning_the_answer_starts_after_a_blank_line(grammars, tokenizer):
    constraint = Constraint("json_schema", schema=SCHEMA)
    assert accepts(grammars, tokenizer, constraint, '\n\n{"ok":true}', after_reasoning=True)
    assert not accepts(grammars, tokenizer, constraint, '{"ok":true}', after_reasoning=True)


@pytest.mark.parametrize("text, ok", [
    ("<tool_call>\n<function=lookup>\n<parameter=q>\nany text\nover lines\n</parameter>\n"
     "<parameter=mode>\nfast\n</parameter>\n</function>\n</tool_call>", True),
    ("<tool_call>\n<function=lookup>\n<parameter=q>\nx\n</parameter>\n<parameter=n>\n12\n</parameter>\n"
     "<parameter=mode>\nexact\n</parameter>\n</function>\n</tool_call>", True),
    ("<tool_call>\n<function=lookup>\n<parameter=q>\nx\n</parameter>\n</function>\n</tool_call>", False),  # mode
    ("<tool_call>\n<function=other>\n</function>\n</tool_call>", False),
    ("<tool_call>\n<function=lookup>\n<parameter=q>\nx\n</parameter>\n<parameter=mode>\nslow\n</parameter>\n"
     "</function>\n</tool_call>", False),
    ("Sure: <tool_call>\n<function=lookup>\n<parameter=q>\nx\n</parameter>\n<parameter=mode>\nfast\n</parameter>\n"
     "</function>\n</tool_call>", False),
])
def test_a_tool_call_grammar_takes_only_well_formed_calls(grammars, tokenizer, text, ok):
    assert accepts(grammars, tokenizer, Constraint("tool_calls", tools=(TOOL,)), text) is ok


def test_one_call_only_unless_parallel(grammars, tokenizer):
    call = ("<tool_call>\n<function=lookup>\n<parameter=q>\nx\n</parameter>\n<parameter=mode>\nfast\n</parameter>\n"
            "</function>\n</tool_call>")
    assert accepts(grammars, tokenizer, Constraint("tool_calls", tools=(TOOL,)), call + "\n" + call)
    assert not accepts(grammars, tokenizer, Constraint("tool_calls", tools=(TOOL,), parallel=False), call + "\n" + call)


def test_a_schema_that_is_not_an_object_is_invalid(grammars):
    with pytest.raises(InvalidGrammarError):
        grammars.matchers(Constraint("json_schema", schema=["not", "a", "schema"]), False, 1)


def test_the_mask_leaves_only_allowed_tokens_finite_and_other_rows_untouched(grammars, tokenizer):
    matcher = grammars.matchers(Constraint("json_schema", schema=SCHEMA), False, 1)[0]
    vocab = len(tokenizer)
    logits = torch.randn(3, vocab + 5)  # logits wider than the tokenizer: the padding is never allowed
    before = logits.clone()
    Masker(4, vocab).apply(logits, [(1, matcher)])

    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([i]) and "{".startswith(tokenizer.decode([i])[:1]) for i in allowed)
    assert torch.equal(logits[1, allowed], before[1, allowed])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])


class _Recorder:
    """A stand-in matcher that records what it is fed (unit test of Row.follow only)."""

    def __init__(self) -> None:
        self.fed: list[int] = []

    def is_stopped(self) -> bool:
        return False

    def consume_token(self, token: int) -> bool:
        self.fed.append(token)
        return token != 99

    def get_error(self) -> str:
        return "refused"


def test_a_row_follows_its_grammar_only_after_the_reasoning_ends():
    matcher = _Recorder()
    row = Row({"input_ids": torch.tensor([[1, 2]])}, RowSampling(), 10, {0}, asyncio.new_event_loop(),
              matcher=matcher, matcher_after=7)
    assert not row.constrained
    assert row.follow(5) is None and matcher.fed == []
    assert row.follow(7) is None and row.constrained and matcher.fed == []
    assert row.follow(5) is None and matcher.fed == [5]
    assert row.follow(99) == "refused"
