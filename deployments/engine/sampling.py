"""Sampling every row of a batch in one pass of batched tensor operations.

Each row has its own parameters (greedy or temperature, top-k, top-p, repetition penalty,
min_tokens) and, when it asked for a seed, its own `torch.Generator`, so a seeded request gives
the same tokens whoever it shares the batch with. Rows are sampled with the exponential race
(`argmax(p / q)`, q ~ Exp(1)), which equals drawing from p and lets each row draw its noise from
its own generator while the rest of the work stays batched.

Isolation: nothing one row's values do can fail another row. Logits are computed in float32 and
overflow is clamped; a row whose logits hold NaN or no finite value is reported as failed (the second
column of `sample`'s result) and sampled as a dummy token, while the others are sampled normally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Below this a temperature is greedy; between it and MIN_TEMPERATURE it is raised to MIN_TEMPERATURE
# (vLLM does the same), so that logits / temperature stays far from float32 overflow.
GREEDY_BELOW = 1e-5
MIN_TEMPERATURE = 1e-2
_FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class RowSampling:
    """One row's resolved sampling parameters (checkpoint defaults already applied)."""

    temperature: float = 0.0  # < GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's own random generator when it asked for a seed, else None (the engine's is used)."""
        if self.seed is None or self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


class BatchParams:
    """Per-row parameters as tensors, rebuilt only when the rows of the batch change."""

    def __init__(self, rows: Sequence[RowSampling], device: torch.device) -> None:
        self.greedy = all(r.greedy for r in rows)
        self.temperature = torch.tensor([max(r.temperature, MIN_TEMPERATURE) if not r.greedy else 1.0 for r in rows],
                                        dtype=torch.float32, device=device)[:, None]
        self.sampled = torch.tensor([not r.greedy for r in rows], device=device)
        self.top_k = torch.tensor([min(r.top_k, 2**31 - 1) if not r.greedy else 0 for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p if not r.greedy else 1.0 for r in rows], dtype=torch.float32,
                                  device=device)[:, None]
        self.use_top_k = bool((self.top_k > 0).any())
        self.use_top_p = bool((self.top_p < 1.0).any())
        self.penalty = torch.tensor([r.repetition_penalty for r in rows], dtype=torch.float32, device=device)[:, None]
        self.use_penalty = any(r.repetition_penalty != 1.0 for r in rows)


def sample(logits: torch.Tensor, params: BatchParams, generators: Sequence[torch.Generator | None],
           shared: torch.Generator, seen: torch.Tensor | None = None,
           blocked: torch.Tensor | None = None, eos_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab), as a tensor of shape (rows, 2): token, failed.

    `seen` (rows, vocab, bool) marks the ids the repetition penalty applies to; `blocked` (rows,
    len(eos_ids), bool) marks the end ids each row may not sample yet (min_tokens). May write into `logits`.
    """
    if params.greedy and not (params.use_penalty and seen is not None):
        return _greedy(logits, blocked, eos_ids)
    logits = logits.float()
    broken = torch.isnan(logits).any(dim=-1)
    logits = logits.nan_to_num(nan=-torch.inf, posinf=_FLOAT_MAX, neginf=-torch.inf)  # +inf: the softmax's NaN
    if params.use_penalty and seen is not None:
        penalised = torch.where(logits > 0, logits / params.penalty, logits * params.penalty)
        logits = torch.where(seen, penalised, logits).clamp(-_FLOAT_MAX, _FLOAT_MAX)
    if blocked is not None and eos_ids is not None:
        logits[:, eos_ids] = logits[:, eos_ids].masked_fill(blocked, -torch.inf)
    failed = broken | ~torch.isfinite(logits).any(dim=-1)
    greedy_tokens = logits.argmax(dim=-1)
    if params.greedy:
        return torch.stack([greedy_tokens, failed.long()], dim=1)
    scaled = (logits / params.temperature).clamp(max=_FLOAT_MAX)  # -inf stays masked; +inf would be NaN
    scaled = _top_k_top_p(scaled, params)
    probs = torch.softmax(scaled, dim=-1).nan_to_num(0.0)
    noise = torch.empty_like(probs).exponential_(generator=shared)
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    drawn = (probs / noise).argmax(dim=-1)
    tokens = torch.where(params.sampled, drawn, greedy_tokens)
    return torch.stack([tokens, failed.long()], dim=1)


def _greedy(logits: torch.Tensor, blocked: torch.Tensor | None, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """Every row greedy, no penalty: one pass over the logits, in their own dtype (bf16 to float32 is exact, so
    the argmax is the one of the general path). A NaN wins argmax and a row of -inf keeps -inf: either fails the
    row, as the general path decides; +inf is a valid maximum there too (clamped to the largest float)."""
    if blocked is not None and eos_ids is not None:
        logits[:, eos_ids] = logits[:, eos_ids].masked_fill(blocked, -torch.inf)
    tokens = logits.argmax(dim=-1)
    best = logits.gather(1, tokens[:, None])[:, 0]
    failed = torch.isnan(best) | (best == -torch.inf)
    return torch.stack([tokens, failed.long()], dim=1)


def _top_k_top_p(logits: torch.Tensor, params: BatchParams) -> torch.Tensor:
    """Mask (to -inf) what each row's top-k and top-p leave out; rows with neither are untouched."""
    if not (params.use_top_k or params.use_top_p):
        return logits
    ordered, _ = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    keep = torch.full((logits.shape[0],), vocab, dtype=torch.long, device=logits.device)
    if params.use_top_k:
        keep = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), keep)
    if params.use_top_p:
        probs = torch.softmax(ordered, dim=-1)
        # Tokens before the one that reaches top_p are kept, that one included (at least one).
        within = (probs.cumsum(dim=-1) - probs < params.top_p).sum(dim=-1).clamp(min=1)
        keep = torch.minimum(keep, within)
    threshold = ordered.gather(1, (keep - 1)[:, None])
    return logits.masked_fill(logits < threshold, -torch.inf)
