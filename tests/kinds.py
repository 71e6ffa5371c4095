"""What a test may compare exactly, whatever kind of CPU it runs on.

Token identity (a greedy answer equal to plain `generate` or to the same request alone, a seed's draws
whoever shares the batch) holds in float32 only. In bf16, which `dtype: auto` picks on a CPU with native
bf16 (AVX512-BF16 / AMX) and on every GPU, a row's logits depend on how many rows its matrix products
computed with (the kernels block and accumulate differently), and random weights give near-tied logits,
so a greedy choice flips after a few tokens. Tests that assert identity pin `EXACT_DTYPE`; the bf16 paths
are tested by the closeness of logits (tests/engine/test_bf16.py), under both kinds of CPU wherever they run
(MINICPM_CPU_BF16 forces what `auto` believes of the CPU).
"""

EXACT_DTYPE = "float32"


def EagerConfig(**settings):  # noqa: N802 - stands in for ModelConfig in the engine tier's fixtures
    """ModelConfig with eager decode steps: `compile_decode` is on by default, and a background compile per
    test engine would cost the suite minutes of CPU (tests/engine/test_compiled.py tests the compiled step)."""
    from deployments.common.config import ModelConfig

    return ModelConfig(**{"compile_decode": False, **settings})
