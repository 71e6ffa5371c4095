"""Per-request sampling with a private random generator.

`generate(do_sample=True)` draws from torch's global generator, which every concurrent
request on a replica shares, so a `seed` would not reproduce anything. Instead generation
runs greedy and this processor, last in the list, samples the token itself with the
request's own `torch.Generator` and leaves only that token finite, so greedy picks it.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class SeededSampler(LogitsProcessor):
    """Samples one token per row from softmax(scores) and masks every other token."""

    def __init__(self, seed: int | None, device: torch.device) -> None:
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self._generator)
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter_(1, chosen, 0.0)


def build_logits_processors(
    temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int | None, device: torch.device
) -> LogitsProcessorList:
    """Processors for one request; temperature 0 means greedy (no sampler)."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature <= 0:
        return processors
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(SeededSampler(seed, device))
    return processors
