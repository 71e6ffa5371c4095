"""Built-in presets: tokenizer, chat template, config, and the full-size parameter count."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, MiniCPMV4_6ForConditionalGeneration

from deployments.errors import CheckpointError
from deployments.presets import PRESETS, chat_template, ensure_preset, model_config
from deployments.presets.tokenizer import SPECIAL_TOKENS, THINK_TOKENS, synthetic_corpus

VARIANTS = ("instruct", "thinking")

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nsecret plan\n</think>\n\nhello there"},
    {"role": "user", "content": "again"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["thinking"])


@pytest.fixture(scope="module")
def config(tiny_checkpoints):
    return json.loads((tiny_checkpoints["thinking"] / "config.json").read_text())


@pytest.fixture(scope="module")
def processors(tiny_checkpoints):
    return {variant: AutoProcessor.from_pretrained(tiny_checkpoints[variant]) for variant in VARIANTS}


def render(processor, messages=CONVERSATION, **kwargs):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


# --- tokenizer ---------------------------------------------------------------------------


def test_tiny_tokenizer_has_exactly_the_config_text_vocab_size(tokenizer, config):
    assert len(tokenizer) == config["text_config"]["vocab_size"] == PRESETS["tiny"].vocab_size
    assert max(tokenizer.get_vocab().values()) == len(tokenizer) - 1


@pytest.mark.parametrize("token", SPECIAL_TOKENS + THINK_TOKENS)
def test_each_control_token_encodes_to_a_single_id(tokenizer, token):
    ids = tokenizer.encode(token, add_special_tokens=False)
    assert len(ids) == 1
    assert tokenizer.convert_tokens_to_ids(token) == ids[0]
    assert ids[0] != tokenizer.unk_token_id


def test_tokenizer_image_and_video_token_ids_match_config(tokenizer, config):
    assert tokenizer.image_token_id == config["image_token_id"]
    assert tokenizer.video_token_id == config["video_token_id"]
    assert tokenizer.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tokenizer.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")


def test_think_tags_survive_skip_special_tokens_while_control_tokens_do_not(tokenizer):
    ids = tokenizer.encode("<|im_start|><think>x</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


# --- chat template -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_carries_the_current_source_chat_template(tiny_checkpoints, variant):
    # A cached preset built from an older template would make the tests below check stale text.
    saved = (tiny_checkpoints[variant] / "chat_template.jinja").read_text()
    assert saved == chat_template(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_thinking_off_prefills_an_empty_think_block(processors, variant):
    prompt = render(processors[variant], enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_on_opens_a_think_block_for_the_thinking_variant(processors):
    prompt = render(processors["thinking"], enable_thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_thinking_on_leaves_the_instruct_assistant_turn_open(processors):
    prompt = render(processors["instruct"], enable_thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not prompt.endswith("<think>\n")


def test_default_thinking_is_on_for_thinking_variant_and_off_for_instruct(processors):
    assert render(processors["thinking"]).endswith("assistant\n<think>\n")
    assert render(processors["instruct"]).endswith("assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_earlier_assistant_turns_lose_their_think_block(processors, variant, enable_thinking):
    prompt = render(processors[variant], enable_thinking=enable_thinking)
    assert "secret plan" not in prompt
    assert "<|im_start|>assistant\nhello there<|im_end|>\n" in prompt
    assert prompt.startswith("<|im_start|>user\nhi<|im_end|>\n")
    assert "<|im_start|>user\nagain<|im_end|>\n" in prompt


# --- preset registry ---------------------------------------------------------------------


def test_unknown_preset_raises_checkpoint_error_naming_known_presets():
    with pytest.raises(CheckpointError) as excinfo:
        ensure_preset("nope", "instruct")
    message = str(excinfo.value)
    assert "nope" in message
    for name in PRESETS:
        assert name in message


def test_synthetic_corpus_is_deterministic_for_a_seed():
    first = list(synthetic_corpus(n_words=2000, seed=3))
    again = list(synthetic_corpus(n_words=2000, seed=3))
    other = list(synthetic_corpus(n_words=2000, seed=4))
    assert first == again
    assert first != other
    assert any("\u4e00" <= ch <= "\u62ff" for line in first for ch in line)  # CJK is in it


class FakeTokenizer:
    """Just what `model_config` reads from a tokenizer, with the real checkpoint's ids."""

    image_token_id = 248056
    video_token_id = 248057
    pad_token_id = 0

    def __len__(self) -> int:
        return 248094

    def convert_tokens_to_ids(self, token: str) -> int:
        return 1


def test_full_size_preset_config_builds_a_model_of_about_1_3b_parameters():
    cfg = model_config(PRESETS["full-size"], FakeTokenizer())
    assert cfg.image_token_id == 248056
    assert cfg.video_token_id == 248057
    assert cfg.text_config.vocab_size == 248094
    with torch.device("meta"):
        model = MiniCPMV4_6ForConditionalGeneration(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.0e9 <= n_params <= 1.6e9
