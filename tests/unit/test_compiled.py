"""DecodeStep's switching between its compiled graphs and the eager step, with fake steps (the real
compiled step on the real model: tests/engine/test_compiled.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from deployments.engine.compiled import CompiledForward, DecodeStep, SuffixForward


def step_with(compiled) -> DecodeStep:
    """A DecodeStep whose eager step returns zeros and whose 'compiled graphs' are `compiled`."""
    step = DecodeStep(torch.nn.Identity(), False, lambda: None)
    step._eager = lambda ids, positions, mask, cache: torch.zeros(ids.shape[0], 4)
    step._compiled = compiled
    return step


def call(step: DecodeStep) -> torch.Tensor:
    return step(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), None, None)


def test_steps_run_compiled_once_the_graphs_exist():
    step = step_with(lambda ids, positions, mask, cache: torch.ones(ids.shape[0], 4))
    assert step.compiled and torch.equal(call(step), torch.ones(2, 4)) and step.compiled_steps == 1


def test_a_failing_compiled_step_fails_once_then_the_steps_run_eagerly():
    def broken(*args):
        raise RuntimeError("kernel fault")

    step = step_with(broken)
    with pytest.raises(RuntimeError, match="kernel fault"):
        call(step)
    assert not step.compiled and "kernel fault" in str(step.error)
    assert torch.equal(call(step), torch.zeros(2, 4)) and step.compiled_steps == 0


def test_without_compile_every_step_is_eager():
    step = DecodeStep(torch.nn.Identity(), False, lambda: None)
    assert not step.compiled and step.wait_compiled(0) is False and step.warm_up_s is None


def test_the_suffix_forward_hands_its_graphs_tensors_of_their_own():
    """The engine passes slices of its prompt-wide tensors. A slice over one row is contiguous, yet keeps the
    whole tensor's stride, and the graphs guard on strides: a slice would miss them (and run eagerly)."""
    suffix = SuffixForward(torch.nn.Identity(), False, 8, torch.float32, torch.device("cpu"))
    assert not suffix.covers(1, 5, 8), "no graphs yet"
    seen = []
    suffix._compiled = lambda *args: seen.extend(args[:3]) or torch.zeros(1)
    positions = torch.arange(40)[None]
    suffix(torch.zeros(1, 40, 8)[:, 30:], torch.ones(1, 40)[:, :35], positions[:, 30:35], None)
    assert [tensor.stride() for tensor in seen] == [(80, 8, 1), (35, 1), (5, 1)]
    assert torch.equal(seen[2], torch.arange(30, 35)[None]) and suffix.compiled_calls == 1
    assert suffix.covers(1, 5, 8) and not suffix.covers(1, 0, 8) and not suffix.covers(2, 5, 8)


def test_the_process_wide_trace_inductor_caches_is_done_before_the_warm_up_thread_starts():
    """torch.fx.symbolic_trace patches torch.nn.Module.__call__ for every thread while it runs; inductor runs it
    once per process. Building a compiled forward does that first trace itself, so no warm-up traces it while
    another thread runs a forward."""
    from torch._inductor.loop_body import InterpreterShim

    InterpreterShim._dummy_gm.cache_clear()
    started = threading.Event()
    CompiledForward(lambda x: x, True, lambda run: started.wait(5))
    assert InterpreterShim._dummy_gm.cache_info().currsize == 1
    started.set()
