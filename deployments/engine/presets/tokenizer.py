"""A real byte-level BPE tokenizer with MiniCPM-V 4.6's special tokens, trained offline.

The presets need a tokenizer that behaves like the real one (ChatML control tokens, image and
video placeholders, `<think>` tags that survive `skip_special_tokens=True`) but nothing can be
downloaded, so one is trained here on a deterministic synthetic corpus. The vocabulary is
trained full: a random-weight model samples every id uniformly, and ids that decode to
nothing would make streams look empty.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Control and placeholder tokens of MiniCPM-V 4.6 (Qwen3.5 text tower + MiniCPM-V slicing tags).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
]
# Ordinary added tokens: they must survive `skip_special_tokens=True` so reasoning can be split.
THINK_TOKENS = ["<think>", "</think>"]

NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}

# Qwen2/Qwen3 pre-tokenizer split: contractions, letters, single digits, punctuation, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ONSETS = ["", "b", "k", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "s", "l", "t", "nd"]
_PUNCTUATION = [".", ",", "!", "?", ":", ";", " -", "\n", "\n\n"]


def _word(rng: random.Random) -> str:
    syllables = rng.choices([1, 2, 3, 4], weights=[4, 5, 3, 1])[0]
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def synthetic_corpus(n_words: int, seed: int) -> Iterator[str]:
    """Yield deterministic lines of pseudo-words, digits, punctuation and CJK characters.

    CJK characters are multi-byte in UTF-8, so the trained vocabulary holds tokens that are
    partial characters, exercising the incremental detokenizer the way real Chinese text does.
    """
    rng = random.Random(seed)
    line: list[str] = []
    for _ in range(n_words):
        roll = rng.random()
        if roll < 0.08:
            line.append("".join(chr(rng.randint(0x4E00, 0x62FF)) for _ in range(rng.randint(1, 4))))
        elif roll < 0.11:
            line.append(str(rng.randint(0, 9999)))
        else:
            line.append(_word(rng))
        if rng.random() < 0.12:
            line.append(rng.choice(_PUNCTUATION))
        if len(line) >= 24:
            yield " ".join(line)
            line = []
    if line:
        yield " ".join(line)


def train_tokenizer(vocab_size: int, seed: int, chat_template: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` ids (special tokens included)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    n_special = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(synthetic_corpus(n_words=max(20_000, vocab_size * 12), seed=seed), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
        chat_template=chat_template,
        padding_side="left",
        **NAMED_TOKENS,
    )
    tokenizer.add_tokens(THINK_TOKENS, special_tokens=False)
    return tokenizer
