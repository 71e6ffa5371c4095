"""Configuration: pydantic models with descriptions; the one place that holds defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.presets import Variant


class ModelConfig(BaseModel):
    """What one model deployment loads and how it generates."""

    model_config = ConfigDict(extra="forbid")

    variant: Variant = Field(description="Which variant this deployment serves: 'instruct' or 'thinking'.")
    checkpoint: str = Field(
        default="preset:tiny",
        description="A local checkpoint directory, a hub id (needs network), or 'preset:<tiny|small|full-size>' "
        "for a built-in random-weight checkpoint (random text; built on first use into the preset cache).",
    )
    served_name: str | None = Field(
        default=None,
        description="The name clients use in `model`. Default: MiniCPM-V-4.6 / MiniCPM-V-4.6-Thinking.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype. auto: bfloat16 on a GPU, float32 on a CPU (bf16 is slower there)."
    )
    device: str = Field(default="auto", description="torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1...")
    max_model_len: int | None = Field(
        default=None, gt=0,
        description="Prompt + max_tokens limit. Default: the checkpoint's max_position_embeddings.",
    )
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads for CPU inference. Default: torch's choice."
    )

    @property
    def name(self) -> str:
        return self.served_name or ("MiniCPM-V-4.6-Thinking" if self.variant == "thinking" else "MiniCPM-V-4.6")
