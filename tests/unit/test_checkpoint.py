"""What `dtype: auto` makes of the CPU, and the bf16 linear layer for CPUs that emulate bf16: which weights each
row count reads, and what it computes."""

from __future__ import annotations

import pytest
import torch

from deployments.engine.checkpoint import (
    CPU_BF16_ENV, RowAdaptiveLinear, _row_adaptive_linear_layers, cpu_has_native_bf16, cpu_kind, pick_dtype,
)
from deployments.common.errors import CheckpointError

F = torch.nn.functional


@pytest.mark.parametrize(("forced", "dtype"), [("native", torch.bfloat16), ("emulated", torch.float32)])
def test_the_environment_forces_what_auto_makes_of_the_cpu(monkeypatch, forced, dtype):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert pick_dtype("auto", torch.device("cpu")) == dtype
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32  # an explicit dtype is never changed
    assert f"dtype auto -> {dtype}".replace("torch.", "") in cpu_kind() and forced in cpu_kind()


def test_a_misspelt_cpu_kind_is_refused_with_the_values_it_takes(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "amx")
    with pytest.raises(CheckpointError, match="'native' or 'emulated'"):
        cpu_has_native_bf16()


def adaptive(out_features: int = 96, in_features: int = 64, bias: bool = True) -> RowAdaptiveLinear:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias)).to(torch.bfloat16)
    _row_adaptive_linear_layers(model)
    return model[0]


def test_one_row_uses_the_bf16_weights_bit_for_bit():
    layer = adaptive()
    for shape in ((64,), (1, 64), (1, 1, 64)):
        x = torch.randn(shape).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_several_rows_compute_in_fp32_on_the_same_values_and_round_once():
    layer = adaptive()
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 96)
    assert torch.equal(out, expected)
    # Row by row, the one-row path gives the same values up to bf16's last bit (summation order).
    alone = torch.stack([torch.stack([layer(row[None])[0] for row in batch]) for batch in x])
    assert torch.allclose(alone.float(), out.float(), rtol=2 ** -7, atol=1e-3)


def test_without_bias():
    layer = adaptive(bias=False)
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert layer.bias_f32 is None
    assert torch.equal(layer(x), F.linear(x.float(), layer.weight.float()).to(torch.bfloat16))


def test_the_fp32_copy_is_never_saved_and_follows_the_module():
    layer = adaptive()
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert layer.weight_f32.dtype == torch.float32 and torch.equal(layer.weight_f32, layer.weight.float())
    moved = layer.to(torch.device("cpu"))
    assert moved.weight_f32.device.type == "cpu"


def test_only_plain_linear_layers_are_converted():
    class Custom(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Custom(8, 8), torch.nn.Conv1d(8, 8, 1)).to(torch.bfloat16)
    _row_adaptive_linear_layers(model)
    assert [type(m) for m in model] == [RowAdaptiveLinear, Custom, torch.nn.Conv1d]
