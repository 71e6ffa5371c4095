"""Per-request seeded sampling through logits processors."""

from __future__ import annotations

import torch

from deployments.sampling import SeededSampler, build_logits_processors

CPU = torch.device("cpu")
VOCAB = 50


def draws(sampler, scores, n):
    """The token chosen in row 0 by `n` successive calls."""
    input_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    return [int(sampler(input_ids, scores.clone())[0].argmax()) for _ in range(n)]


def flat_scores(rows=1):
    return torch.zeros((rows, VOCAB))


def test_seeded_sampler_leaves_exactly_one_finite_entry_per_row():
    scores = torch.randn((4, VOCAB), generator=torch.Generator().manual_seed(0))
    out = SeededSampler(seed=1, device=CPU)(torch.zeros((4, 1), dtype=torch.long), scores)
    assert out.shape == scores.shape
    finite = torch.isfinite(out)
    assert finite.sum(dim=-1).tolist() == [1, 1, 1, 1]
    assert torch.all(out[finite] == 0.0)
    assert torch.all(out[~finite] == float("-inf"))


def test_seeded_sampler_same_seed_gives_same_sequence_of_choices():
    a = draws(SeededSampler(seed=123, device=CPU), flat_scores(), 40)
    b = draws(SeededSampler(seed=123, device=CPU), flat_scores(), 40)
    assert a == b
    assert len(set(a)) > 1  # it really samples, rather than always picking one token


def test_seeded_sampler_different_seeds_give_different_sequences():
    a = draws(SeededSampler(seed=1, device=CPU), flat_scores(), 40)
    b = draws(SeededSampler(seed=2, device=CPU), flat_scores(), 40)
    assert a != b


def test_seeded_sampler_is_unaffected_by_the_global_torch_generator():
    torch.manual_seed(0)
    a = draws(SeededSampler(seed=7, device=CPU), flat_scores(), 20)
    torch.manual_seed(999)
    torch.rand(100)
    b = draws(SeededSampler(seed=7, device=CPU), flat_scores(), 20)
    assert a == b


def test_seeded_sampler_never_picks_a_masked_token():
    scores = torch.full((1, VOCAB), float("-inf"))
    allowed = {3, 17, 41}
    scores[0, list(allowed)] = 0.0
    assert set(draws(SeededSampler(seed=5, device=CPU), scores, 60)) <= allowed


def test_temperature_zero_builds_no_seeded_sampler():
    processors = build_logits_processors(
        temperature=0.0, top_p=0.5, top_k=5, repetition_penalty=1.2, seed=3, device=CPU
    )
    assert not any(isinstance(p, SeededSampler) for p in processors)
    assert len(processors) == 1  # only the repetition penalty


def test_positive_temperature_puts_the_seeded_sampler_last():
    processors = build_logits_processors(
        temperature=0.7, top_p=0.9, top_k=10, repetition_penalty=1.0, seed=3, device=CPU
    )
    assert isinstance(processors[-1], SeededSampler)
    assert sum(isinstance(p, SeededSampler) for p in processors) == 1


def test_top_k_one_always_picks_the_argmax():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.zeros((3, 1), dtype=torch.long)
    for seed in range(20):
        scores = torch.randn((3, VOCAB), generator=generator)
        processors = build_logits_processors(
            temperature=1.5, top_p=1.0, top_k=1, repetition_penalty=1.0, seed=seed, device=CPU
        )
        out = processors(input_ids, scores.clone())
        assert torch.equal(out.argmax(dim=-1), scores.argmax(dim=-1))
        assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 1, 1]


def test_full_pipeline_with_same_seed_is_reproducible():
    scores = torch.randn((2, VOCAB), generator=torch.Generator().manual_seed(1))
    input_ids = torch.zeros((2, 1), dtype=torch.long)

    def run(seed):
        processors = build_logits_processors(
            temperature=0.8, top_p=0.95, top_k=20, repetition_penalty=1.0, seed=seed, device=CPU
        )
        return [processors(input_ids, scores.clone()).argmax(dim=-1).tolist() for _ in range(30)]

    assert run(11) == run(11)
    assert run(11) != run(12)
