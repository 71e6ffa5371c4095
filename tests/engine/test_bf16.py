"""The bf16 path on both kinds of CPU, whichever this machine is: `dtype: auto` and the batched engine.

MINICPM_CPU_BF16 makes `auto` resolve as on the other kind, so an AVX2-only machine checks what an
AVX512-BF16 / AMX one (or a GPU) runs, and the other way round. In bf16 a row's logits depend on its batch
mates (tests/kinds.py), so the batched engine is checked by closeness of logits, not by token identity:
at every step until a row's greedy tokens alone and in a batch part, its logits agree to bf16's rounding;
where they part, the two choices were a near-tie of the row's own logits.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.engine.checkpoint import CPU_BF16_ENV, RowAdaptiveLinear, cpu_kind
from deployments.engine.engine import Engine
from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams
from tests.kinds import EagerConfig

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TOKENS = 16
# bf16 keeps 8 significant bits: a logit computed with other shapes may differ by a few of its steps at the
# row's scale (seen here: one step); eight are allowed.
BF16_STEPS = 8 * 2.0**-8
PROMPTS = ["hello", "a much longer question about the weather today", "short"]


def request(text: str) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [text])], enable_thinking=False,
                             sampling=SamplingParams(max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0),
                             request_id=text[:8])


class Logits:
    """Every batch of logits the engine samples from, in order: request id -> its row's logits (float32 copies):
    a prefill group's rows as they join, or the decode batch's (in slot order)."""

    def __init__(self, engine: Engine) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        core = engine.core

        sample = core._sample_and_update

        def record(logits: torch.Tensor, first: int) -> None:
            rows = core._rows[first:]  # a prefill's rows have just joined: they are the last ones
            copies = logits.detach().float()
            self.calls.append({row.request_id: copies[i].clone() for i, row in enumerate(rows)})
            sample(logits, first)

        core._sample_and_update = record


def record_rows(engine: Engine) -> dict[str, list[int]]:
    """request id -> the token ids its row generates (filled as the engine runs)."""
    tokens: dict[str, list[int]] = {}
    submit = engine.core.submit

    def recording(family) -> None:
        tokens[family[0].request_id] = family[0].tokens
        submit(family)

    engine.core.submit = recording
    return tokens


async def run(engine: Engine, text: str) -> None:
    async for _ in engine.stream(request(text)):
        pass


@pytest.fixture(params=["native", "emulated"])
def cpu(request, monkeypatch) -> str:
    monkeypatch.setenv(CPU_BF16_ENV, request.param)
    print(f"as {cpu_kind()}")
    return request.param


def bf16_engine(checkpoint, cpu: str, **settings) -> Engine:
    # On a native kind `auto` is bf16 already; on an emulated one bf16 must be asked for.
    dtype = "auto" if cpu == "native" else "bfloat16"
    return Engine(EagerConfig(variant="instruct", checkpoint=str(checkpoint), torch_threads=1, dtype=dtype, **settings))


def test_auto_resolves_to_bf16_only_where_the_cpu_is_taken_for_native(tiny_checkpoints, cpu):
    engine = Engine(EagerConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), torch_threads=1))
    assert engine.model.dtype == (torch.bfloat16 if cpu == "native" else torch.float32)
    assert not any(isinstance(m, RowAdaptiveLinear) for m in engine.model.modules())


async def test_a_row_in_a_bf16_batch_has_the_logits_it_has_alone_until_a_near_tie(tiny_checkpoints, cpu):
    alone_engine = bf16_engine(tiny_checkpoints["instruct"], cpu, max_batch_size=1)
    batch_engine = bf16_engine(tiny_checkpoints["instruct"], cpu, max_batch_size=4, batch_wait_ms=300)
    assert alone_engine.model.dtype == batch_engine.model.dtype == torch.bfloat16
    # RowAdaptiveLinear (fp32 copies for several rows) exactly where bf16 is emulated.
    assert any(isinstance(m, RowAdaptiveLinear) for m in batch_engine.model.modules()) == (cpu == "emulated")
    alone_logits, batch_logits = Logits(alone_engine), Logits(batch_engine)
    alone_tokens, batch_tokens = record_rows(alone_engine), record_rows(batch_engine)
    alone_steps = {}
    for text in PROMPTS:
        alone_logits.calls.clear()
        await run(alone_engine, text)
        alone_steps[request(text).request_id] = list(alone_logits.calls)
    await asyncio.gather(*(run(batch_engine, text) for text in PROMPTS))
    assert [len(t) for t in batch_tokens.values()] == [TOKENS] * len(PROMPTS)
    assert len(batch_logits.calls[0]) == len(PROMPTS), "the three prompts were prefilled together"
    for row, steps in alone_steps.items():
        for step, (mine, ours) in enumerate(zip(alone_tokens[row], batch_tokens[row])):
            single, batched = steps[step][row], batch_logits.calls[step][row]
            tolerance = BF16_STEPS * float(single.abs().max())
            torch.testing.assert_close(batched, single, atol=tolerance, rtol=0.0,
                                       msg=lambda m: f"request {row}, step {step}: {m}")
            if mine != ours:  # the two choices were within bf16's rounding of each other (often equal): a tie
                assert abs(single[mine] - single[ours]) <= 2 * tolerance, f"request {row} parted at step {step} untied"
                print(f"request {row}: alone and batched greedy tokens part at step {step} on a tie")
                break
