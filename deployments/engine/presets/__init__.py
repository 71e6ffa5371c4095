"""Built-in random-weight MiniCPM-V 4.6 checkpoints, built offline with the real classes.

They produce random text. They exist so the service, its tests and its benchmarks run on a
machine with no network and no GPU, through exactly the loading and generation code that
serves the real `openbmb/MiniCPM-V-4.6` checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    MiniCPMV4_6Config,
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_6ImageProcessor,
    MiniCPMV4_6Processor,
    MiniCPMV4_6VideoProcessor,
)

from deployments.common.errors import CheckpointError
from deployments.engine.presets.tokenizer import train_tokenizer
from deployments.common.types import Variant

logger = logging.getLogger("ray.serve")

PRESET_PREFIX = "preset:"
# Bump when a preset's recipe changes, so caches built by older code are not reused.
RECIPE_VERSION = 2
SEED = 46


@dataclass(frozen=True)
class PresetSpec:
    """Dimensions of one built-in checkpoint. Defaults are the real MiniCPM-V 4.6 values."""

    description: str
    vocab_size: int = 248_094
    text_hidden: int = 1024
    text_layers: int = 24
    text_heads: int = 8
    text_kv_heads: int = 2
    head_dim: int = 256
    text_intermediate: int = 3584
    linear_heads: int = 16
    linear_head_dim: int = 128
    max_position_embeddings: int = 32_768
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_intermediate: int = 4304
    vision_image_size: int = 980
    insert_layer_id: int = 6
    image_size: int = 1120
    # Image processor: the real default is 448 px slices, up to 9 per image.
    scale_resolution: int = 448
    max_slice_nums: int = 9
    dtype: torch.dtype = torch.bfloat16
    # The real model ties input and output embeddings. Tied random weights make greedy decoding
    # repeat one token forever, so the small presets untie them to produce varied random text.
    tie_embeddings: bool = True


PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        description="about 1M parameters: tests and the default demo; builds in seconds",
        vocab_size=8192, text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=32,
        text_intermediate=128, linear_heads=2, linear_head_dim=16, max_position_embeddings=4096,
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
        vision_image_size=112, insert_layer_id=1, image_size=112,
        scale_resolution=112, max_slice_nums=2, dtype=torch.float32, tie_embeddings=False,
    ),
    "small": PresetSpec(
        description="about 60M parameters: CPU benchmarks",
        vocab_size=32_000, text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, head_dim=64,
        text_intermediate=1536, linear_heads=4, linear_head_dim=64, max_position_embeddings=8192,
        vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=256,
        vision_image_size=448, insert_layer_id=2, image_size=448,
        scale_resolution=224, max_slice_nums=4, dtype=torch.float32, tie_embeddings=False,
    ),
    "full-size": PresetSpec(description="the real MiniCPM-V 4.6 dimensions (about 1.3B parameters): GPU benchmarks"),
}


def model_config(spec: PresetSpec, tokenizer) -> MiniCPMV4_6Config:
    """The MiniCPM-V 4.6 config of a preset, with token ids taken from its tokenizer."""
    # partial_rotary_factor 0.25 leaves head_dim / 4 rotary dims: mrope sections sum to half that.
    rotary_half = spec.head_dim // 8
    mrope = [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3]
    text = {
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "head_dim": spec.head_dim,
        "linear_num_key_heads": spec.linear_heads,
        "linear_num_value_heads": spec.linear_heads,
        "linear_key_head_dim": spec.linear_head_dim,
        "linear_value_head_dim": spec.linear_head_dim,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "mrope_section": mrope, "mrope_interleaved": True,
        },
        "tie_word_embeddings": spec.tie_embeddings,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.vision_image_size,
        "patch_size": 14,
    }
    return MiniCPMV4_6Config(
        text_config=text,
        vision_config=vision,
        insert_layer_id=spec.insert_layer_id,
        image_size=spec.image_size,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        tie_word_embeddings=spec.tie_embeddings,
    )


def chat_template(variant: Variant) -> str:
    """The preset chat template. Both variants share it, thinking off unless enable_thinking is true."""
    return (Path(__file__).parent / "chat_template.jinja").read_text()


def build_preset(name: str, variant: Variant, out_dir: Path) -> Path:
    """Build preset `name` for `variant` into `out_dir` with `save_pretrained`; returns `out_dir`.

    Deterministic: the same name, variant and recipe version give the same weights and vocab.
    Raises CheckpointError for an unknown preset name.
    """
    spec = _spec(name)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    template = chat_template(variant)
    tokenizer = train_tokenizer(spec.vocab_size, seed=SEED, chat_template=template)
    image_processor = MiniCPMV4_6ImageProcessor(
        scale_resolution=spec.scale_resolution, max_slice_nums=spec.max_slice_nums
    )
    video_processor = MiniCPMV4_6VideoProcessor(scale_resolution=spec.scale_resolution, max_slice_nums=1)
    processor = MiniCPMV4_6Processor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=template
    )
    processor.save_pretrained(out_dir)

    config = model_config(spec, tokenizer)
    torch.manual_seed(SEED + (variant == "thinking"))
    model = MiniCPMV4_6ForConditionalGeneration(config).to(spec.dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Built preset %r (%s, %.1fM parameters) in %.1fs at %s",
                name, variant, n_params / 1e6, time.monotonic() - started, out_dir)
    return out_dir


def cache_dir() -> Path:
    """Where presets named in a config are built on first use (MINICPM_PRESET_CACHE overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicpm-serve" / "presets"
    return Path(os.environ.get("MINICPM_PRESET_CACHE", default))


def ensure_preset(name: str, variant: Variant) -> Path:
    """The cached directory of a preset, building it first if needed.

    Several replicas may start at once: each builds into a private temporary directory and
    renames it into place, so a reader never sees a half-written checkpoint.
    """
    _spec(name)
    target = cache_dir() / f"{name}-{variant}-v{RECIPE_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Preset %r (%s) not cached yet: building it into %s", name, variant, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_preset(name, variant, tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _spec(name: str) -> PresetSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"Unknown preset {name!r}; built-in presets are: {', '.join(PRESETS)}") from None
