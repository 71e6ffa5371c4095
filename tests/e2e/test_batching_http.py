"""Batching through Ray Serve: concurrent HTTP requests share the replica's batch, and each one's greedy output
equals plain `model.generate` run alone on the same checkpoint."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from deployments.engine import checkpoint
from deployments.engine.presets import ensure_preset
from tests.e2e.conftest import SINGLE_APP, process_info
from tests.kinds import EXACT_DTYPE
from tests.e2e.test_hostile import answered
from tests.e2e.test_reliability import wait_idle
from tests.e2e.test_service import CHAT

PROMPTS = ["Tell me about rivers", "What is a prime number?", "Write a haiku about snow", "Name three birds",
           "Explain tides briefly", "Why is the sky blue?"]
TOKENS = 24


@pytest.fixture(scope="module")
def reference() -> list[str]:
    """Each prompt alone through the processor and `model.generate`, greedy, one thread (as the replica)."""
    # The dtype of the replica it is compared with, token for token (tests/kinds.py).
    processor, model = checkpoint.load(str(ensure_preset("tiny", "instruct")), "instruct", EXACT_DTYPE, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts = []
        for prompt in PROMPTS:
            inputs = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True,
                tokenize=True, return_dict=True, return_tensors="pt", enable_thinking=False)
            out = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return texts
    finally:
        torch.set_num_threads(threads)


def test_concurrent_requests_share_a_batch_and_equal_plain_generate(serve_url, reference):
    wait_idle(SINGLE_APP, "instruct")  # what earlier tests left running would hold the replica's slots
    admissions_before = len(process_info(SINGLE_APP, "instruct")["batch_sizes"])

    def ask(prompt: str) -> dict:
        with httpx.Client(base_url=serve_url, timeout=120) as http:
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS, "min_tokens": TOKENS,
                    "temperature": 0}
            return answered(http, body, f"/single{CHAT}")

    with ThreadPoolExecutor(3) as pool:  # below the single app's 4 requests at once
        answers = list(pool.map(ask, PROMPTS))
    sizes = process_info(SINGLE_APP, "instruct")["batch_sizes"][admissions_before:]
    assert max(sizes) >= 2, f"the requests never shared a batch: {sizes}"
    assert [a["choices"][0]["message"]["content"] for a in answers] == reference
    assert all(a["usage"]["completion_tokens"] == TOKENS for a in answers)
