"""Finding and loading a MiniCPM-V 4.6 checkpoint with the standard transformers API."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration, ProcessorMixin

from deployments.common.errors import CheckpointError
from deployments.engine.presets import PRESET_PREFIX, ensure_preset
from deployments.common.types import Variant

logger = logging.getLogger("ray.serve")


def resolve(source: str, variant: Variant) -> str:
    """A loadable location for `source`: `preset:<name>`, a local directory, or a hub id.

    Raises CheckpointError for an unknown preset or a path that does not exist.
    """
    if source.startswith(PRESET_PREFIX):
        return str(ensure_preset(source[len(PRESET_PREFIX):], variant))
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"Checkpoint directory {source!r} does not exist")
    return source


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 (the checkpoints' own dtype) on a GPU and on a CPU with native bf16 instructions,
    float32 on other CPUs. There bf16 is emulated: a batch of 8 decoded 6x slower than in fp32, so bf16
    models get `RowAdaptiveLinear` layers, whose one-row and several-row paths may round differently;
    in float32 a greedy answer never depends on its batch mates."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return getattr(torch, dtype)


# Forces what `dtype: auto` believes of this CPU: "native" (as on AVX512-BF16 / AMX: bf16) or "emulated" (as on
# AVX2-only CPUs: float32). Lets one machine check the other kind's behaviour (the tests do), or pin a fleet.
CPU_BF16_ENV = "MINICPM_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), unless MINICPM_CPU_BF16 says otherwise."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("native", "emulated"):
        return forced == "native"
    if forced:
        raise CheckpointError(f"{CPU_BF16_ENV} must be 'native' or 'emulated', not {forced!r}")
    return bool(_bf16_flags())


def _bf16_flags() -> list[str]:
    """This CPU's bf16 instruction flags (AVX512-BF16, AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({flag for flag in flags if flag in ("avx512_bf16", "amx_bf16")})


def cpu_kind() -> str:
    """One line naming this CPU's kind for test and benchmark output: its model, its bf16 flags, and what
    `dtype: auto` resolves to here (and whether MINICPM_CPU_BF16 forced it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = _bf16_flags()
    kind = "native bf16" if flags else "AVX2-class, bf16 emulated"
    forced = os.environ.get(CPU_BF16_ENV)
    auto = "bfloat16" if cpu_has_native_bf16() else "float32"
    return (f"{model}, {os.cpu_count()} CPUs: {kind} ({', '.join(flags) or 'no avx512_bf16/amx'}); "
            f"dtype auto -> {auto}" + (f" (forced by {CPU_BF16_ENV}={forced})" if forced else ""))


def load(
    source: str, variant: Variant, dtype: str = "auto", device: str = "auto"
) -> tuple[ProcessorMixin, MiniCPMV4_6ForConditionalGeneration]:
    """Load processor and model; repairs missing image/video token ids in the config.

    Raises CheckpointError naming the checkpoint when it is missing or broken.
    """
    location = resolve(source, variant)
    torch_device = pick_device(device)
    try:
        processor = AutoProcessor.from_pretrained(location)
        model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
            location, dtype=pick_dtype(dtype, torch_device)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Cannot load MiniCPM-V 4.6 checkpoint {source!r}: {exc}") from exc
    _repair_token_ids(model, processor, source)
    model.to(torch_device).eval()
    if torch_device.type == "cpu" and model.dtype != torch.float32:
        _convolutions_in_float32(model)
    if torch_device.type == "cpu" and model.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        _row_adaptive_linear_layers(model)
    logger.info("Loaded %r (%s) on %s as %s", source, variant, torch_device, model.dtype)
    return processor, model


def _convolutions_in_float32(model: torch.nn.Module) -> None:
    # The linear-attention layers' depthwise conv1d has no fast bf16/fp16 CPU kernel: torch falls back to
    # one small conv2d per channel (measured: 2/3 of a bf16 decode step). Its weights are tiny; in float32
    # it takes the fast path, and the reference conv code casts its input to the weight's dtype anyway.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d) and module.groups > 1 and module.groups == module.in_channels:
            module.float()


class RowAdaptiveLinear(torch.nn.Linear):
    """A bf16 linear layer for CPUs that emulate bf16: one row from the bf16 weights, several from an fp32 copy.

    Decoding one row is bound by memory bandwidth, and torch's bf16 matrix-vector product reads half
    the bytes of fp32's. For several rows the emulated bf16 matrix product is slow (measured: 2-4x
    fp32's at 8 rows), so they use an fp32 copy of the same weights: the exact products of bf16
    values, summed in fp32 as the one-row path sums them, rounded to bf16 once. The two paths differ
    only in summation order, as fp32 matrix kernels for one and for several rows do.
    """

    weight_f32: torch.Tensor
    bias_f32: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x.float(), self.weight_f32, self.bias_f32).to(x.dtype)


def _row_adaptive_linear_layers(model: torch.nn.Module) -> None:
    # The copies are buffers outside the state dict: they follow .to() and are never saved.
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowAdaptiveLinear
            module.register_buffer("weight_f32", module.weight.detach().float(), persistent=False)
            bias = None if module.bias is None else module.bias.detach().float()
            module.register_buffer("bias_f32", bias, persistent=False)


def _repair_token_ids(model: MiniCPMV4_6ForConditionalGeneration, processor: ProcessorMixin, source: str) -> None:
    # Without image_token_id, generate() with an image dies in get_placeholder_mask with
    # "'bool' object has no attribute 'sum'"; the ids are the tokenizer's pad placeholders.
    for key, token_id in (("image_token_id", processor.image_token_id), ("video_token_id", processor.video_token_id)):
        if getattr(model.config, key, None) is None:
            setattr(model.config, key, token_id)  # the inner model shares this config object
            logger.warning("Checkpoint %r has no %s in config.json; using the tokenizer's id %d", source, key, token_id)
