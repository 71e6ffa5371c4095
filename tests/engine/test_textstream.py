"""Streaming text stages: ids -> text deltas -> stop strings -> (reasoning, answer)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deployments.engine.textstream import IncrementalDetokenizer, ReasoningSplitter, StopMatcher

# Multi-byte UTF-8 (CJK: 3 bytes, emoji: 4 bytes, ZWJ sequences, a skin-tone modifier), which
# byte-level BPE splits into tokens that are partial characters.
MULTIBYTE_TEXTS = [
    "你好，世界！ 🤖🎉 mixed 日本語 text 😀 ok",
    "答案是 42 👍🏽 — “quotes” café naïve",
    "👨\u200d👩\u200d👧\u200d👦 family 中文字符串测试 🎉🎉🎉",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["thinking"])


def stream_ids(tokenizer, ids):
    """Feed ids one at a time; return (deltas, flushed tail)."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    return deltas, detok.flush()


# --- IncrementalDetokenizer ---------------------------------------------------------------


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_detokenizer_one_id_at_a_time_reproduces_full_decode_of_multibyte_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The premise: some ids alone are partial characters, so naive per-id decoding breaks.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas, tail = stream_ids(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_detokenizer_never_emits_replacement_character_for_valid_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = stream_ids(tokenizer, ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "\ufffd" not in tail
    # Text is held back while a character is incomplete, then released.
    assert "" in deltas


def test_detokenizer_with_multi_id_chunks_matches_one_at_a_time(tokenizer):
    text = MULTIBYTE_TEXTS[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert out == text


def test_detokenizer_drops_special_tokens_but_keeps_think_tags(tokenizer):
    text = "<think>\n思考 🤔</think>\n\n答案 👍<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == im_end
    deltas, tail = stream_ids(tokenizer, ids)
    out = "".join(deltas) + tail
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert out == "<think>\n思考 🤔</think>\n\n答案 👍"
    assert "<|im_end|>" not in out


def test_detokenizer_flush_returns_incomplete_character_as_replacement(tokenizer):
    ids = tokenizer.encode("ok 🤖", add_special_tokens=False)
    # Find a cut that leaves the emoji incomplete.
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas, tail = stream_ids(tokenizer, ids[:cut])
    assert "\ufffd" not in "".join(deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tokenizer.decode(ids[:cut], skip_special_tokens=True)


def test_detokenizer_flush_twice_returns_nothing_the_second_time(tokenizer):
    ids = tokenizer.encode("你好", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for i in ids:
        detok.add([i])
    detok.flush()
    assert detok.flush() == ""


# --- StopMatcher -------------------------------------------------------------------------


def match(stops, pieces):
    """Feed pieces; return (emitted text including flush, stopped flag)."""
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    stopped = matcher.stopped
    return out + matcher.flush(), stopped


def test_stop_split_char_by_char_is_not_emitted_and_text_before_it_is():
    out, stopped = match(["STOP"], list("hello STOP world"))
    assert out == "hello "
    assert stopped


def test_stop_matcher_holds_back_a_possible_stop_prefix_until_it_resolves():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hi ST") == "hi "
    assert matcher.feed("O") == ""
    assert matcher.feed("x") == "STOx"
    assert not matcher.stopped


def test_stop_matcher_flush_emits_held_partial_prefix_that_never_completed():
    matcher = StopMatcher(["STOP"])
    out = "".join(matcher.feed(c) for c in "abc STO")
    assert out == "abc "
    assert matcher.flush() == "STO"
    assert not matcher.stopped


def test_stop_matcher_earliest_of_several_stops_wins():
    out, stopped = match(["STOP", "END"], ["hello END middle STOP tail"])
    assert (out, stopped) == ("hello ", True)
    out, stopped = match(["STOP", "END"], list("hello END middle STOP tail"))
    assert (out, stopped) == ("hello ", True)


def test_stop_matcher_with_no_stops_passes_everything_through():
    matcher = StopMatcher([])
    assert matcher.feed("anything <|im_end|> S") == "anything <|im_end|> S"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_stop_matcher_ignores_empty_stop_strings():
    out, stopped = match(["", "X"], list("abcXdef"))
    assert (out, stopped) == ("abc", True)


def test_stop_matcher_emits_nothing_after_the_stop():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("line\n") == "line"
    assert matcher.feed("\nmore") == ""
    assert matcher.stopped
    assert matcher.feed("even more") == ""
    assert matcher.flush() == ""


def test_stop_matcher_stop_at_start_emits_nothing():
    out, stopped = match(["abc"], ["abc", "def"])
    assert (out, stopped) == ("", True)


# --- ReasoningSplitter -------------------------------------------------------------------


def split(pieces, *, in_reasoning=False, may_open=False):
    """Feed pieces, flush, and return the concatenated (reasoning, answer)."""
    splitter = ReasoningSplitter(in_reasoning=in_reasoning, may_open=may_open)
    reasoning, answer = "", ""
    for piece in pieces:
        r, a = splitter.feed(piece)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.flush()
    return reasoning + r, answer + a


def test_splitter_in_reasoning_char_by_char_routes_text_before_close_tag_to_reasoning():
    assert split(list("abc</think>\n\nanswer"), in_reasoning=True) == ("abc", "answer")


CLOSE_TEXT = "abc</think>\n\nanswer"


@pytest.mark.parametrize("cut", range(len(CLOSE_TEXT) + 1))
def test_splitter_close_tag_split_at_any_point_is_still_recognised(cut):
    pieces = [CLOSE_TEXT[:cut], CLOSE_TEXT[cut:]]
    assert split(pieces, in_reasoning=True) == ("abc", "answer")


OPEN_TEXT = "<think>\nR</think>A"


@pytest.mark.parametrize("cut", range(len(OPEN_TEXT) + 1))
def test_splitter_may_open_recognises_open_tag_emitted_by_the_model(cut):
    pieces = [OPEN_TEXT[:cut], OPEN_TEXT[cut:]]
    assert split(pieces, may_open=True) == ("R", "A")


def test_splitter_may_open_char_by_char_recognises_open_and_close_tags():
    assert split(list(OPEN_TEXT), may_open=True) == ("R", "A")


def test_splitter_may_open_without_open_tag_is_all_answer():
    assert split(list("Hello <think> there"), may_open=True) == ("", "Hello <think> there")


def test_splitter_may_open_with_partial_open_tag_that_diverges_is_answer():
    assert split(list("<thin ice>"), may_open=True) == ("", "<thin ice>")


def test_splitter_may_open_flushes_a_held_partial_open_tag_as_answer():
    assert split(["<thi"], may_open=True) == ("", "<thi")


def test_splitter_generation_ending_inside_reasoning_is_all_reasoning_including_partial_tag():
    splitter = ReasoningSplitter(in_reasoning=True, may_open=False)
    reasoning = "".join(splitter.feed(c)[0] for c in "still thinking </thi")
    assert reasoning == "still thinking "
    assert splitter.flush() == ("</thi", "")
    assert split(list("still thinking </thi"), in_reasoning=True) == ("still thinking </thi", "")


def test_splitter_with_neither_flag_treats_think_tags_as_answer():
    text = "<think>\nR</think>A"
    assert split(list(text)) == ("", text)
    assert split([text]) == ("", text)


def test_splitter_drops_leading_whitespace_of_each_section_but_keeps_inner_whitespace():
    text = "\n\n  first  line\n\nsecond </think>\n\n  answer  one\n two  "
    expected = ("first  line\n\nsecond ", "answer  one\n two  ")
    assert split(list(text), in_reasoning=True) == expected
    assert split([text], in_reasoning=True) == expected


def test_splitter_may_open_drops_whitespace_around_open_tag():
    assert split(list("\n <think>\n\n R r</think>\n A a"), may_open=True) == ("R r", "A a")


def test_splitter_empty_reasoning_block_then_answer():
    assert split(list("</think>\n\nanswer"), in_reasoning=True) == ("", "answer")


# --- the whole stream: detokenizer then splitter, as the engine runs them ----------------


@pytest.mark.parametrize("text", [" hello there", "  two spaces", "\nnew line first", " 你好 🤖"])
def test_answer_that_starts_with_whitespace_streams_exactly_the_decoded_text(tokenizer, text):
    """Thinking off: the streamed answer is decode(ids), its leading space included (as vLLM serves it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert split(pieces) == ("", text)


def test_splitter_may_open_without_open_tag_keeps_the_answer_leading_whitespace():
    assert split(list(" Hello"), may_open=True) == ("", " Hello")
    assert split(["\n", " Hello"], may_open=True) == ("", "\n Hello")
    assert split(["  <thi"], may_open=True) == ("", "  <thi")
