"""Built-in presets: tokenizer, chat template, config, and the full-size parameter count."""

from __future__ import annotations

import json

import pytest
import torch
from jinja2.exceptions import TemplateError
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, MiniCPMV4_6ForConditionalGeneration

from deployments.common.errors import CheckpointError
from deployments.engine.presets import PRESETS, chat_template, ensure_preset, model_config
from deployments.engine.presets.tokenizer import SPECIAL_TOKENS, THINK_TOKENS, synthetic_corpus

VARIANTS = ("instruct", "thinking")

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nsecret plan\n</think>\n\nhello there"},
    {"role": "user", "content": "again"},
]

IMAGE = Image.new("RGB", (56, 56), (200, 30, 30))

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
# The system turn the real template writes for TOOLS (no system message).
TOOLS_SYSTEM_TURN = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    + json.dumps(TOOLS[0], ensure_ascii=False)
    + "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and do "
    "not tell the user about function calls\n</IMPORTANT><|im_end|>\n"
)


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


def test_both_variants_share_one_template():
    assert chat_template("instruct") == chat_template("thinking")


@pytest.mark.parametrize("variant", VARIANTS)
def test_thinking_off_prefills_an_empty_think_block(processors, variant):
    prompt = render(processors[variant], enable_thinking=False)
    assert prompt.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_thinking_on_opens_a_think_block(processors, variant):
    prompt = render(processors[variant], enable_thinking=True)
    assert prompt.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_enable_thinking_defaults_to_off_when_not_passed(processors, variant):
    assert render(processors[variant]) == render(processors[variant], enable_thinking=False)
    assert render(processors[variant]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_earlier_assistant_turns_lose_their_think_block(processors, variant, enable_thinking):
    prompt = render(processors[variant], enable_thinking=enable_thinking)
    assert "secret plan" not in prompt
    assert "<|im_start|>assistant\nhello there<|im_end|>\n" in prompt
    assert prompt.startswith("<|im_start|>user\nhi<|im_end|>\n")
    assert "<|im_start|>user\nagain<|im_end|>\n" in prompt


def test_content_parts_are_joined_by_newlines_with_bare_image_and_video_placeholders(processors):
    frames = [Image.new("RGB", (28, 28))] * 2
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [
            {"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"},
            {"type": "video", "video": frames}, {"type": "text", "text": "And this?"},
        ]},
    ]
    assert render(processors["instruct"], messages) == (
        "<|im_start|>system\nBe brief.\nBe kind.<|im_end|>\n"
        "<|im_start|>user\n<|image_pad|>\nWhat is this?\n<|video_pad|>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_processor_expands_the_image_placeholder_into_image_tokens(processors, tokenizer):
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe."}]}]
    inputs = processors["instruct"].apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    n_image_tokens = ids.count(tokenizer.image_token_id)
    assert n_image_tokens == 4  # set by the image size and the tiny preset's processor settings
    assert inputs["pixel_values"].shape[0] == 1
    assert tokenizer.decode(ids) == (
        "<|im_start|>user\n<image_id>0</image_id><image>" + "<|image_pad|>" * n_image_tokens + "</image>\n"
        "Describe.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize(("kind", "part"), [
    ("images", {"type": "image", "image": IMAGE}),
    ("videos", {"type": "video", "video": [IMAGE]}),
])
def test_a_system_message_with_media_raises(processors, kind, part):
    messages = [{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match=f"^System message cannot contain {kind}.$"):
        render(processors["instruct"], messages)


def test_tools_render_into_the_system_turn_before_the_system_message(processors):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    assert render(processors["instruct"], messages, tools=TOOLS) == (
        TOOLS_SYSTEM_TURN.replace("<|im_end|>", "\n\nBe brief.<|im_end|>")
        + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_tools_open_a_system_turn_when_there_is_no_system_message(processors):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    assert render(processors["thinking"], messages, tools=TOOLS, enable_thinking=True) == (
        TOOLS_SYSTEM_TURN + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_a_tool_call_round_trip_renders_xml_calls_and_grouped_tool_responses(processors):
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Rome", "units": {"temp": "C"}}}},
        ]},
        {"role": "tool", "content": "Paris: sunny"},
        {"role": "tool", "content": "Rome: rain"},
    ]
    prompt = render(processors["instruct"], messages, tools=TOOLS)
    assert prompt == TOOLS_SYSTEM_TURN + (
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo cities: two calls.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        '<parameter=units>\n{"temp": "C"}\n</parameter>\n</function>\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nParis: sunny\n</tool_response>\n"
        "<tool_response>\nRome: rain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_tool_call_after_text_is_separated_by_a_blank_line(processors):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "snow"},
    ]
    assert (
        "<|im_start|>assistant\n<think>\n\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsnow\n</tool_response><|im_end|>\n"
    ) in render(processors["instruct"], messages, tools=TOOLS)


def test_reasoning_is_kept_only_for_assistant_turns_after_the_last_user_query(processors):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "", "reasoning_content": "new thoughts", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "snow"},
        {"role": "assistant", "content": "<think>\nsplit thoughts\n</think>\n\nIt snows."},
        {"role": "user", "content": "third"},
    ]
    before_last_query = render(processors["instruct"], messages)
    assert "thoughts" not in before_last_query
    assert "<|im_start|>assistant\none<|im_end|>\n" in before_last_query
    assert "<|im_start|>assistant\nIt snows.<|im_end|>\n" in before_last_query

    agent_loop = render(processors["instruct"], messages[:-1])
    assert "old thoughts" not in agent_loop
    assert "<|im_start|>assistant\none<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n" in agent_loop
    assert (
        "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsnow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsplit thoughts\n</think>\n\nIt snows.<|im_end|>\n"
    ) in agent_loop


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
