"""Time to first token over the turns of a chat that keeps its image, with and without the caches.

    python -m benchmarks.multiturn --rounds 5

Serves the instruct variant of a preset (`small` by default) through Ray Serve, once with the
replica's caches on (prefix, vision features, processor output, received media) and once with all
off. Each round is a new 5-turn chat whose first user message carries a photo-sized JPEG (1280x960)
as a data URL (`--media video`: a 4 s 640x480 MP4), resent every turn as a client does (the web
page included); each answer (greedy, 16 tokens) goes back into the history, at once or after
`--think-ms` (a reader's pause). `--compile`: later turns' prefills run compiled in the caches-on run.
Prints the median time to first token of every turn, turn k against turn 1, and the replica's
cache bytes and hits.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from benchmarks.service import start_app, stop_app, wait_compiled
from benchmarks import announce_cpu

TURNS = 5
QUESTIONS = ["What is in this picture?", "What colours stand out?", "Is there any text?", "Where could it be?",
             "Summarise it in one line."]


def photo(seed: int, size: tuple[int, int] = (1280, 960)) -> str:
    """A photo-like JPEG data URL: smooth gradients plus noise, ~quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([np.sin(x / rng.uniform(50, 200) + c) * np.cos(y / rng.uniform(50, 200) - c) for c in range(3)], -1)
    pixels = ((base + 1) * 110 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def clip(seed: int, size: tuple[int, int] = (640, 480), frames: int = 32, fps: int = 8) -> str:
    """A video-like MP4 data URL (4 s at 8 fps): drifting smooth gradients with a little noise, H.264."""
    import av  # the test requirements' encoder; the service itself only decodes

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    scales = rng.uniform(50, 200, (3, 2))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for t in range(frames):
            base = np.stack([np.sin((x + 6 * t) / scales[c, 0] + c) * np.cos(y / scales[c, 1] - c) for c in range(3)], -1)
            pixels = ((base + 1) * 110 + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def turn(client: httpx.Client, messages: list[dict], tokens: int) -> tuple[float, str]:
    """Stream one turn; (seconds to the first content, the answer)."""
    body = {"model": "instruct", "messages": messages, "stream": True, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0}
    started, first, answer = time.perf_counter(), None, []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            text = delta[0]["delta"].get("content") if delta else None
            if text:
                first = first or time.perf_counter() - started
                answer.append(text)
    return first, "".join(answer)


def chat_rounds(url: str, rounds: int, tokens: int, seed: int, media: str = "image", think_s: float = 0.0
                ) -> list[list[float]]:
    """Time to first token of each turn, per round (a new chat and a new photo or clip each round); the client
    waits `think_s` after each answer before it sends the next turn, as a person reading it would."""
    results = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for r in range(rounds):
            if media == "video":
                part = {"type": "video_url", "video_url": {"url": clip(seed + r)}}
            else:
                part = {"type": "image_url", "image_url": {"url": photo(seed + r)}}
            messages: list[dict] = []
            ttfts = []
            for k in range(TURNS):
                content: list[dict] = [{"type": "text", "text": QUESTIONS[k]}]
                if k == 0:
                    content.insert(0, part)
                messages.append({"role": "user", "content": content})
                ttft, answer = turn(client, messages, tokens)
                messages.append({"role": "assistant", "content": answer})
                ttfts.append(ttft)
                time.sleep(think_s)
            results.append(ttfts)
    return results


def cache_info() -> dict:
    from ray import serve

    info = serve.get_deployment_handle("instruct", app_name="bench").process_info.remote().result()
    found = {name: info[name] for name in ("prefix_cache", "vision_cache", "processor_cache", "media_store")
             if name in info}
    if info["resumed_prefill"]["compile"]:
        found["compiled_resumed_prefills"] = info["resumed_prefill"]["compiled_calls"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--media", choices=("image", "video"), default="image",
                        help="what the first message carries: a 1280x960 JPEG, or a 4 s 640x480 MP4 (32 frames)")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="pause between an answer's end and the next turn (a reader's pause; 0: none)")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile_resumed_prefill for the caches-on run (measured once compiled)")
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="model.prefix_cache_min_tokens for the caches-on run (default: the service's)")
    args = parser.parse_args()
    announce_cpu()

    report = {}
    for label, budget in (("caches on", None), ("caches off", 0)):
        model = {"checkpoint": f"preset:{args.preset}", "torch_threads": args.threads}
        if budget is not None:
            model |= {"prefix_cache_bytes": budget, "vision_cache_bytes": budget, "processor_cache_bytes": budget,
                      "media_store_bytes": budget}
        else:
            if args.min_tokens is not None:
                model |= {"prefix_cache_min_tokens": args.min_tokens}
            model |= {"compile_resumed_prefill": args.compile}
        url = start_app({"instruct": {"model": model}, "thinking": None})
        if budget is None and args.compile:
            wait_compiled("resumed_prefill")
        turn(httpx.Client(base_url=url, timeout=600), [{"role": "user", "content": "warm up"}], 2)
        rounds = chat_rounds(url, args.rounds, args.tokens, args.seed, args.media, args.think_ms / 1000)
        medians = [statistics.median(r[k] for r in rounds) for k in range(TURNS)]
        report[label] = {"ttft_ms": [round(m * 1000, 1) for m in medians],
                         "range_ms": [(round(min(r[k] for r in rounds) * 1000, 1), round(max(r[k] for r in rounds) * 1000, 1))
                                      for k in range(TURNS)],
                         "vs_turn_1": [round(m / medians[0], 2) for m in medians], **cache_info()}
        print(label, json.dumps(report[label]), flush=True)
    stop_app()
    on, off = report["caches on"]["ttft_ms"], report["caches off"]["ttft_ms"]
    print("turn:            " + "  ".join(f"{k + 1:>8}" for k in range(TURNS)))
    print("ttft on (ms):    " + "  ".join(f"{v:>8}" for v in on))
    print("ttft off (ms):   " + "  ".join(f"{v:>8}" for v in off))
    print("on / on turn 1:  " + "  ".join(f"{v / on[0]:>8.2f}" for v in on))


if __name__ == "__main__":
    main()
