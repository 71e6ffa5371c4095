"""The engine core's sampler: the next token of every row it is given, in one batched pass.

It holds what sampling needs across steps for the rows in their slots: their batched parameters (rebuilt
when the rows change), the ids each row has seen (for the repetition penalty), the end ids each may not
sample yet (min_tokens), and the grammar masks of constrained rows; it records the log-probabilities rows
asked for and advances each constrained row's grammar by its token. What a row then does with its token
(streams it, ends) is the core's update step.
"""

from __future__ import annotations

import torch

from deployments.common.errors import GrammarError, NumericalError, ServiceError
from deployments.engine.grammar import Masker
from deployments.engine.rows import Row
from deployments.engine.sampling import BatchParams, sample

# What a log-probability reads as when it underflows: JSON has no -Infinity (vLLM clamps the same way).
MIN_LOGPROB = -9999.0


class Sampler:
    """Samples the rows of slots first.. (`rows`) of the running batch (`running`, in slot order)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows, self.device = max_rows, device
        self._masker = Masker(max_rows, vocab_size)
        self._seen: torch.Tensor | None = None  # (max_rows, vocab) ids the repetition penalty applies to
        self._params: BatchParams | None = None  # of the running rows; None when they changed
        self._eos: torch.Tensor | None = None  # the running rows' end-of-sequence (and stop) ids
        self._shared_generator = torch.Generator(device=device)
        self._shared_generator.seed()

    def rows_changed(self) -> None:
        """The running rows are not those of the last step any more: rebuild the batched parameters."""
        self._params = None

    def move(self, source: int, slot: int) -> None:
        """The row of slot `source` now lives in `slot` (the core compacts its slots)."""
        if self._seen is not None:
            self._seen[slot] = self._seen[source]

    def sample(self, logits: torch.Tensor, running: list[Row], first: int
               ) -> tuple[torch.Tensor, list[tuple[int, ServiceError | None]]]:
        """The tokens (on the device) of rows first.. of `running`, whose logits these are, and per row its token
        and the error that ends it instead (non-finite scores, a grammar that refuses the token), if any."""
        rows = running[first:]
        if self._params is None:
            self._params = BatchParams([r.sampling for r in running], self.device)
            self._eos = _eos_tensor(running, self.device)
            if self._params.use_penalty:
                self._ensure_seen(logits.shape[-1], running)
        params = self._params if first == 0 else BatchParams([r.sampling for r in rows], self.device)
        eos = self._eos if first == 0 else _eos_tensor(rows, self.device)
        if first > 0 and self._seen is not None:
            for slot, row in enumerate(rows, start=first):
                self._seen[slot] = False
                self._seen[slot, row.prompt_ids] = True
        seen = self._seen[first : first + len(rows)] if self._seen is not None else None
        logprobs = _logprob_table(logits, rows) if any(r.want_logprobs is not None for r in rows) else None
        constrained = [(i, row.matcher) for i, row in enumerate(rows) if row.constrained]
        broken = self._masker.apply(logits, constrained) if constrained else {}
        draws = sample(logits, params, [r.generator for r in rows], self._shared_generator, seen,
                       self._blocked(rows, eos), eos)
        tokens = draws[:, 0]
        if seen is not None:
            seen[torch.arange(len(rows), device=self.device), tokens] = True
        if logprobs is not None:
            _record_logprobs(logprobs, tokens, rows)
        return tokens, [(token, self._refusal(row, token, failed, broken.get(i)))
                        for i, (row, (token, failed)) in enumerate(zip(rows, draws.tolist()))]  # one host copy

    @staticmethod
    def _refusal(row: Row, token: int, failed: bool, broken: str | None) -> ServiceError | None:
        if failed:
            return NumericalError("The model produced invalid (non-finite) scores for this request")
        refused = broken or row.follow(token)
        return GrammarError(f"Constrained decoding failed: {refused}") if refused else None

    def _blocked(self, rows: list[Row], eos: torch.Tensor) -> torch.Tensor | None:
        """(rows, len(eos)): which of `eos` each row may not sample yet (its own end ids, under min_tokens;
        a grammar alone decides where a constrained row may end)."""
        early = [r.generated < r.sampling.min_tokens and r.matcher is None for r in rows]
        if not any(early):
            return None
        ids = eos.tolist()
        return torch.tensor([[e and i in r.eos_ids for i in ids] for r, e in zip(rows, early)], device=self.device)

    def _ensure_seen(self, vocab: int, running: list[Row]) -> None:
        if self._seen is None:
            self._seen = torch.zeros(self.max_rows, vocab, dtype=torch.bool, device=self.device)
            for slot, row in enumerate(running):
                self._seen[slot, row.prompt_ids] = True
                self._seen[slot, row.tokens] = True


def _eos_tensor(rows: list[Row], device: torch.device) -> torch.Tensor:
    ids = sorted(set().union(*(r.eos_ids for r in rows)))
    return torch.tensor(ids, dtype=torch.long, device=device)


def _logprob_table(logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], torch.Tensor]:
    """The asking rows and their log-probabilities under the model's raw distribution (before temperature,
    penalties and grammar masks, as vLLM reports them by default)."""
    index = [i for i, row in enumerate(rows) if row.want_logprobs is not None]
    return index, torch.log_softmax(logits[index].float(), dim=-1).clamp(min=MIN_LOGPROB).nan_to_num(MIN_LOGPROB)


def _record_logprobs(table: tuple[list[int], torch.Tensor], tokens: torch.Tensor, rows: list[Row]) -> None:
    """Append each asking row's chosen-token log-probability and top alternatives."""
    index, logprobs = table
    chosen = logprobs.gather(1, tokens[index, None])[:, 0].tolist()
    k = max(rows[i].want_logprobs for i in index)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    for j, (values, ids) in enumerate(zip(top_values.tolist(), top_ids.tolist())):
        row = rows[index[j]]
        row.logprobs.append((chosen[j], list(zip(ids, values))[: row.want_logprobs]))
