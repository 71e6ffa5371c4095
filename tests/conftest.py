"""Shared fixtures: the built-in tiny checkpoints, built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before anything imports the presets module or starts Ray, so Ray workers inherit it.
os.environ.setdefault("MINICPM_PRESET_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "presets"))


@pytest.fixture(scope="module")
def restore_torch_threads() -> Iterator[None]:
    """Engine(torch_threads=...) sets a process-wide value: a module of in-process engines gives the
    modules after it theirs back (`pytestmark = pytest.mark.usefixtures("restore_torch_threads")`)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoints() -> dict[str, Path]:
    """Directories of the `tiny` preset for both variants (built on first use, then cached)."""
    from deployments.engine.presets import ensure_preset

    return {variant: ensure_preset("tiny", variant) for variant in ("instruct", "thinking")}


def pytest_terminal_summary(terminalreporter) -> None:
    """Which kind of CPU the run was on (printed with -q too): bf16 is native (AVX512-BF16 / AMX) or emulated,
    and `dtype: auto` follows (tests/kinds.py says what that changes)."""
    from deployments.engine.checkpoint import cpu_kind

    terminalreporter.write_line(f"CPU: {cpu_kind()}")
