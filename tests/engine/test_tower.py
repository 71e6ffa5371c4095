"""The engine's own text tower (deployments/engine/tower.py) against transformers' modules, on the real tiny
checkpoint: the decode step's logits at every batch shape (float32 and bf16), its cache states, and whole
generations through the engine with either decode path (float32: identical greedy text)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from deployments.common.config import ModelConfig
from deployments.common.types import ChatMessage, GenerationRequest, SamplingParams
from deployments.engine import checkpoint
from deployments.engine.compiled import reference_decode
from deployments.engine.engine import Engine
from deployments.engine.slots import SlotCache
from deployments.engine.tower import TextTower
from tests.kinds import EXACT_DTYPE

# bf16 rounds each operation to 8 bits of mantissa, and the two paths order their operations differently
# (fused projections, grouped attention): logits agree within a few bf16 steps of their scale.
TOLERANCE = {"float32": 1e-5, "bfloat16": 8 * 2**-8}


def caches(model, prompts: list[torch.Tensor]) -> tuple[SlotCache, SlotCache]:
    """Two slot caches holding the same prefilled prompts, one per decode path."""
    config = model.config.get_text_config()
    conv_dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Conv1d))
    pair = []
    for _ in range(2):
        cache = SlotCache(config, 4, 512, model.dtype, model.device, conv_dtype, initial_len=12)
        for slot, ids in enumerate(prompts):
            prefilled = DynamicCache(config=config)
            model.model.language_model(input_ids=ids[None], cache=prefilled, use_cache=True)
            cache.load(slot, prefilled, 0, 0, len(ids))
        pair.append(cache)
    return pair[0], pair[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_tower_gives_transformers_logits_and_states_at_every_batch_shape(tiny_checkpoints, dtype):
    model = checkpoint.load(str(tiny_checkpoints["instruct"]), "instruct", dtype, "cpu")[1]
    text, head = model.model.language_model, model.lm_head
    with torch.inference_mode():
        reference, tower = reference_decode(text, head), TextTower(text, head)
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 1000, (length,), generator=generator) for length in (5, 11, 2, 7)]
        expected_cache, got_cache = caches(model, prompts)
        ids = torch.stack([p[-1] for p in prompts])
        # one row; four of unequal lengths; three (a row left); one again: each for several steps, the cache
        # growing past its first 12 columns on the way
        for rows in (1, 4, 3, 1):
            for _ in range(5):
                positions, mask = expected_cache.begin_step(rows)
                expected = reference(ids[:rows, None], positions, mask, expected_cache)
                positions, mask = got_cache.begin_step(rows)
                got = tower(ids[:rows, None], positions, mask, got_cache)
                scale = expected.abs().max().item()
                assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * max(scale, 1.0), (rows, dtype)
                expected_cache.end_step()
                got_cache.end_step()
                ids[:rows] = expected.argmax(-1)  # both paths get the same next tokens
        assert got_cache.capacity > 12
        for store in ("keys", "values", "conv", "recurrent"):
            for layer, tensor in getattr(expected_cache, store).items():
                torch.testing.assert_close(getattr(got_cache, store)[layer][:4], tensor[:4],
                                           **({} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-5}))


def test_the_tower_shares_the_checkpoint_tensors_and_leaves_the_reference_forward_unchanged(tiny_checkpoints):
    model = checkpoint.load(str(tiny_checkpoints["instruct"]), "instruct", "float32", "cpu")[1]
    text = model.model.language_model
    ids = torch.arange(20, 40)[None]
    with torch.inference_mode():
        before = text(input_ids=ids).last_hidden_state
        parameters = sum(p.numel() for p in model.parameters())
        tower = TextTower(text, model.lm_head)
        after = text(input_ids=ids).last_hidden_state
    assert torch.equal(before, after), "the prompt forward sees the same weights"
    assert sum(p.numel() for p in model.parameters()) == parameters
    linear = next(layer.linear_attn for layer in text.layers if hasattr(layer, "linear_attn"))
    fused = next(m for m in tower.mixers if hasattr(m, "w_in")).w_in.weight
    assert linear.in_proj_qkv.weight.data_ptr() == fused.data_ptr(), "a view into the fused weight, not a copy"


def chat(content: list, tokens: int, **sampling) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", content)], enable_thinking=False,
                             sampling=SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, **sampling))


async def test_generations_through_either_decode_path_are_identical_in_float32(tiny_checkpoints):
    def engine(path: str) -> Engine:
        return Engine(ModelConfig(variant="instruct", checkpoint=str(tiny_checkpoints["instruct"]), dtype=EXACT_DTYPE,
                                  max_batch_size=8, compile_decode=False, decode_path=path, torch_threads=1))

    image = Image.new("RGB", (300, 200), "green")
    requests = [chat(["a long answer please"], 60), chat(["hi"], 20), chat([image, "describe this picture"], 25),
                chat(["three answers"], 12, n=3), chat(["penalised"], 30, repetition_penalty=1.4)]

    async def texts(e: Engine) -> list[list[str]]:
        async def one(request: GenerationRequest) -> list[str]:
            out = {}
            async for chunk in e.stream(request):
                out[chunk.index] = out.get(chunk.index, "") + chunk.content
            return [out[i] for i in sorted(out)]

        return list(await asyncio.gather(*(one(r) for r in requests)))

    ours, theirs = engine("engine"), engine("transformers")
    assert ours.core.runner.decode_path == "engine" and theirs.core.runner.decode_path == "transformers"
    assert await texts(ours) == await texts(theirs)
