"""Text helpers of the streaming stages (stop strings, reasoning tags, tool-call tags)."""

from __future__ import annotations

from collections.abc import Sequence


def partial_suffix(text: str, tokens: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tokens`: what a stream must
    hold back until the next piece tells whether a tag or stop string begins there."""
    longest = 0
    for token in tokens:
        for size in range(min(len(token) - 1, len(text)), longest, -1):
            if text.endswith(token[:size]):
                longest = size
                break
    return longest
