"""Batched sampling: each row its own parameters, seeds independent of batch mates, and no value of one
row able to fail another (property tests with extreme values)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.engine.sampling import BatchParams, RowSampling, sample

VOCAB = 50


def draw(logits: torch.Tensor, rows: list[RowSampling], seen: torch.Tensor | None = None,
         blocked: torch.Tensor | None = None, eos: list[int] | None = None) -> tuple[list[int], list[int]]:
    shared = torch.Generator().manual_seed(0)
    out = sample(logits, BatchParams(rows, logits.device), [r.generator(logits.device) for r in rows], shared, seen,
                 blocked, torch.tensor(eos) if eos else None)
    return out[:, 0].tolist(), out[:, 1].tolist()


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, VOCAB)
    tokens, failed = draw(logits, [RowSampling()] * 3)
    assert tokens == logits.argmax(-1).tolist() and failed == [0, 0, 0]


def test_a_seeded_row_draws_the_same_tokens_whoever_shares_its_batch():
    logits = torch.randn(1, VOCAB)
    seeded = RowSampling(temperature=1.0, seed=1234)
    alone = [draw(logits, [seeded])[0][0] for _ in range(3)]
    with_others = draw(torch.cat([torch.randn(2, VOCAB), logits]), [RowSampling(temperature=1.0), RowSampling(),
                                                                      seeded])[0][2]
    assert alone == [alone[0]] * 3 and with_others == alone[0]


def test_seeded_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    counts = [0, 0, 0]
    for seed in range(600):
        counts[draw(probs.log(), [RowSampling(temperature=1.0, seed=seed)])[0][0]] += 1
    assert 360 < counts[0] < 480 and 70 < counts[1] < 170 and 20 < counts[2] < 100


def test_top_k_one_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(2, VOCAB)
    rows = [RowSampling(temperature=2.0, top_k=1, seed=1), RowSampling(temperature=2.0, top_p=1e-6, seed=2)]
    assert draw(logits, rows)[0] == logits.argmax(-1).tolist()


def test_top_k_keeps_sampling_within_the_k_best():
    logits = torch.randn(1, VOCAB)
    best = set(logits.topk(3).indices[0].tolist())
    for seed in range(40):
        assert draw(logits, [RowSampling(temperature=2.0, top_k=3, seed=seed)])[0][0] in best


def test_min_tokens_masks_eos_only_in_rows_that_must_go_on():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 10.0  # eos is the argmax of both rows
    tokens, _ = draw(logits, [RowSampling(), RowSampling()], blocked=torch.tensor([[True], [False]]), eos=[7])
    assert tokens[0] != 7 and tokens[1] == 7


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, 3] = True
    assert draw(logits, [RowSampling(repetition_penalty=2.0)], seen=seen)[0] == [4]


def test_a_row_with_nan_logits_fails_alone():
    logits = torch.randn(3, VOCAB)
    expected = logits.argmax(-1).tolist()
    logits[1, 5] = math.nan
    tokens, failed = draw(logits, [RowSampling(), RowSampling(temperature=1.0, seed=3), RowSampling()])
    assert failed == [0, 1, 0]
    assert [tokens[0], tokens[2]] == [expected[0], expected[2]]


def test_a_row_with_no_finite_logit_fails_alone():
    logits = torch.randn(2, VOCAB)
    logits[0] = -math.inf
    tokens, failed = draw(logits, [RowSampling(temperature=1.0, seed=1), RowSampling()])
    assert failed == [1, 0] and tokens[1] == logits[1].argmax().item()


finite_logit = st.floats(min_value=-1e38, max_value=1e38, allow_nan=False)
extreme_row = st.builds(
    RowSampling,
    temperature=st.sampled_from([0.0, 1e-30, 1e-6, 1e-5, 0.01, 1.0, 2.0]),
    top_p=st.sampled_from([1e-30, 1e-6, 0.5, 1.0]),
    top_k=st.sampled_from([0, 1, 5, 10**9]),
    repetition_penalty=st.sampled_from([1e-30, 1e-3, 1.0, 2.0]),
    seed=st.one_of(st.none(), st.sampled_from([0, -(2**63), 2**64 - 1])),
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(extreme_row, min_size=1, max_size=4),
       values=st.lists(finite_logit, min_size=4 * VOCAB, max_size=4 * VOCAB),
       infinities=st.booleans())
def test_extreme_but_valid_parameters_never_fail_a_row_with_finite_logits(rows, values, infinities):
    logits = torch.tensor(values, dtype=torch.float32).view(4, VOCAB)[: len(rows)]
    if infinities:
        logits[:, 0], logits[:, 1] = math.inf, -math.inf  # overflow as a model could produce it
    seen = torch.rand(len(rows), VOCAB) < 0.5
    tokens, failed = draw(logits, rows, seen=seen)
    assert failed == [0] * len(rows)
    assert all(0 <= t < VOCAB and logits[i, t] > -math.inf for i, t in enumerate(tokens)), "a masked token won"


def test_all_greedy_rows_fail_and_pick_as_the_general_path_does():
    """The all-greedy pass (one argmax over the logits) against the general path's rules: a NaN or a row with no
    finite logit fails that row only; +inf is a valid maximum; blocked end ids are skipped."""
    logits = torch.randn(5, VOCAB)
    logits[0, 5] = math.nan
    logits[1] = -math.inf
    logits[2, 9] = math.inf
    logits[3, 7] = 50.0  # the end id, blocked below
    expected = logits.nan_to_num(nan=-math.inf, posinf=3e38).argmax(-1).tolist()
    rows = [RowSampling()] * 5
    tokens, failed = draw(logits.clone(), rows, blocked=torch.tensor([[False], [False], [False], [True], [False]]),
                          eos=[7])
    assert failed == [1, 1, 0, 0, 0]
    assert tokens[2] == 9 and tokens[3] != 7 and tokens[4] == expected[4]
    bf16 = logits[2:].to(torch.bfloat16)
    assert draw(bf16, rows[2:])[0] == bf16.float().nan_to_num(posinf=3e38).argmax(-1).tolist()
