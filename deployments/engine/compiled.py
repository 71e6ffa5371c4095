"""Forwards of the text tower run eagerly or compiled with `torch.compile` (inductor): the decode step,
and a chat's later turn (a short prompt suffix over a prefix the prefix cache restored).

An eager forward of a few positions on a CPU spends about as long launching the text tower's ~1000
small operations (norms, gates, rotary, the linear-attention recurrences) as reading its weights;
inductor fuses them. Each compiled forward is the model's own forward, with every size that changes
from call to call reaching it as a tensor's shape, so that one graph serves them all:

- `DecodeStep`, traced on the engine's `SlotCache` (rows, columns, cache capacity). Two graphs: a
  step of one row (the row-adaptive linear layers take their one-row path there, and no mask is
  needed) and a step of several rows (always masked, so that rows of equal and unequal lengths
  share it).
- `SuffixForward`, traced on a one-row `DynamicCache` (the prefix's and the suffix's lengths). Two
  graphs, for suffixes of 2 to 31 and of 33 to 63 positions: the linear-attention kernel runs each
  suffix as one chunk of 32 or 64 (`deployments.engine.prefill.StateTaps`). Other suffixes, prompts
  prefilled from scratch and groups of several prompts stay eager.

Compiling takes tens of seconds per graph on a small CPU, so it never happens under the running
rows' feet: a background thread builds the graphs at start on a scratch cache while the engine runs
eagerly, and the engine switches to them once they exist. After that a call that would need a new
graph (a guard no warm-up call met) runs eagerly instead of compiling, and a compiled call that
raises fails its rows and turns those graphs off for the replica's later calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from deployments.engine.slots import SlotCache

logger = logging.getLogger("ray.serve")

# One compile at a time in a process, and never a compiled call during another graph's compile: the
# stance a compiled call runs under is process-wide, and would turn that compile into an eager run.
_COMPILE_LOCK = threading.Lock()

# The linear-attention kernel's chunk in each graph of the compiled suffix forward: a suffix runs as one chunk,
# in the graph of the smallest longer than it (the kernel pays for whole chunks: one graph with chunks of 64
# saved less of a short suffix's eager forward, BENCHMARKS.md). Longer, not as long: the graphs are traced on a
# padded chunk, and guard that the suffix is not one.
SUFFIX_CHUNKS = (32, 64)
SUFFIX_MAX = SUFFIX_CHUNKS[-1] - 1  # the longest suffix compiled


class CompiledForward:
    """A forward that runs eagerly until a background thread has built its compiled graphs, then compiled.

    `warm_up(run)` builds the graphs: it calls `run(*args)` with the example inputs of each graph (marked
    dynamic where their sizes change), in the warm-up thread under inference mode.
    """

    # What a compiled call does when its graphs do not fit it (tests make it fail instead).
    fallback = "eager_on_recompile"
    name = "forward"

    def __init__(self, eager: Callable, compile: bool, warm_up: Callable[[Callable], None],
                 freeze: bool = False) -> None:
        self._eager = eager
        self._compiled: Callable | None = None
        self.compiled_calls = 0  # calls handed to the compiled graphs (one no graph fits runs eagerly there)
        self.warm_up_s: float | None = None  # how long building the graphs took, once done
        self.error: Exception | None = None  # why compiling, or a compiled call, failed, if one did
        self._thread: threading.Thread | None = None
        if compile:
            _use_compile_cache()
            _trace_once_before_threads()
            # Guards on the modules' attributes cost about 1 ms per call and protect nothing: the
            # engine never changes its model's modules.
            # `freeze`: the module's weights become constants of the graphs, which lets inductor prepack them for
            # the CPU's matrix kernels (oneDNN: AVX512-BF16 / AMX). The prepacked copies add to the weights' memory.
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if freeze:
                options["freezing"] = True
            graphs = torch.compile(eager, dynamic=True, options=options)
            self._thread = threading.Thread(target=self._warm_up, args=(graphs, warm_up),
                                            name=f"{self.name.replace(' ', '-')}-compile", daemon=True)
            self._thread.start()

    @property
    def compiled(self) -> bool:
        """Whether calls run compiled now (the graphs are built)."""
        return self._compiled is not None

    def state(self, asked: bool) -> dict:
        """Whether compiling was asked for (`asked`), is done, how long it took, and why it failed, if it did."""
        return {"compile": asked, "compiled": self.compiled, "compile_s": self.warm_up_s,
                "compile_error": repr(self.error) if self.error else None}

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the warm-up ended (built or failed); whether calls run compiled now."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.compiled

    def __call__(self, *args) -> torch.Tensor:
        compiled = self._compiled
        if compiled is not None and _COMPILE_LOCK.acquire(blocking=False):
            try:
                with torch.compiler.set_stance(self.fallback):
                    out = compiled(*args)
                self.compiled_calls += 1
                return out
            except Exception as exc:
                # This call's rows fail (a half-run graph may have moved their states); later calls run
                # eagerly, so that a fault of the compiled graphs cannot fail every call of the replica.
                self._compiled, self.error = None, exc
                logger.error("The compiled %s failed; running it eagerly from now on", self.name, exc_info=exc)
                raise
            finally:
                _COMPILE_LOCK.release()
        return self._eager(*args)

    def _warm_up(self, graphs: Callable, warm_up: Callable[[Callable], None]) -> None:
        started = time.monotonic()
        logger.info("Compiling the %s in the background (cache: %s); it runs eagerly until then", self.name,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR"))

        def run(*args):
            with _COMPILE_LOCK:
                return graphs(*args)

        try:
            with torch.inference_mode():  # as the engine runs: guards check it
                warm_up(run)
        except Exception as exc:  # no C++ compiler, an operator inductor cannot lower...: stay eager
            self.error = exc
            logger.warning("Compiling the %s failed; running it eagerly", self.name, exc_info=exc)
            return
        self.warm_up_s = time.monotonic() - started
        self._compiled = graphs
        logger.info("The %s compiled in %.0f s; running it compiled", self.name, self.warm_up_s)


COMPILE_CACHE_ENV = "MINICPM_COMPILE_CACHE"


def _use_compile_cache() -> None:
    """Inductor's on-disk caches (compiled kernels, graphs) in a directory that outlives the process and /tmp
    cleaning: MINICPM_COMPILE_CACHE, else ~/.cache/minicpm-serve/compile; a later start of the same graphs then
    skips most of the compile. An explicit TORCHINDUCTOR_CACHE_DIR wins."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicpm-serve" / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.environ.get(COMPILE_CACHE_ENV, str(default)))


def _trace_once_before_threads() -> None:
    """Inductor traces one tiny function with `torch.fx.symbolic_trace` once per process (then cached), and symbolic
    tracing patches `torch.nn.Module.__call__` process-wide while it runs: a forward on another thread in that
    instant fails ("module is not installed as a submodule"; seen on a replica whose eager step ran beside the
    warm-up). Done here, on the thread building the engine, before any forward can run beside a compile."""
    try:
        from torch._inductor.loop_body import InterpreterShim

        InterpreterShim._dummy_gm()
    except (ImportError, AttributeError):  # another torch: nothing known to trace
        pass


class DecodeStep(CompiledForward):
    """Logits (rows, vocab) of the next token of each running row, from its last token and the cache:
    `forward(ids (rows, 1), positions (rows, 1), mask, cache)`, the engine's own text tower
    (`deployments/engine/tower.py`) or the transformers modules' (`reference_decode`)."""

    name = "decode step"

    def __init__(self, forward: Callable, compile: bool, scratch_cache: Callable[[], SlotCache],
                 freeze: bool = False) -> None:
        def warm_up(run: Callable) -> None:
            """The one-row and the several-row graph, on a scratch cache."""
            cache = scratch_cache()
            for rows in (1, 2):
                cache.lengths[:rows] = torch.arange(3, 3 + rows)  # unequal lengths: the masked path
                positions, mask = cache.begin_step(rows, masked=rows > 1)
                ids = torch.zeros(rows, 1, dtype=torch.long, device=positions.device)
                _mark_dynamic(ids, positions, mask, cache)
                run(ids, positions, mask, cache)

        super().__init__(forward, compile, warm_up, freeze)

    @property
    def compiled_steps(self) -> int:
        """Decode steps run by a compiled graph."""
        return self.compiled_calls


def reference_decode(text: torch.nn.Module, lm_head: torch.nn.Module) -> Callable:
    """The decode step through the checkpoint's transformers modules (the reference the engine's tower matches)."""
    def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: SlotCache) -> torch.Tensor:
        hidden = text(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                      attention_mask={"full_attention": mask, "linear_attention": None}).last_hidden_state
        return lm_head(hidden[:, -1])

    return step


class SuffixForward(CompiledForward):
    """Hidden states (1, suffix, hidden) of one prompt's suffix, forwarded over the prefix its one-row
    DynamicCache holds: `(embeds, mask, positions, cache)`, the mask over prefix and suffix."""

    name = "suffix forward"

    def __init__(self, text: torch.nn.Module, compile: bool, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        def forward(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                    cache: DynamicCache) -> torch.Tensor:
            return text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True).last_hidden_state

        def warm_up(run: Callable) -> None:
            """One graph per chunk size, each for a suffix it holds over a prefix of 3 (built by one-position
            forwards, which reach no tap)."""
            for length in (5, *(chunk + 3 for chunk in SUFFIX_CHUNKS[:-1])):  # one per chunk size
                cache = DynamicCache(config=text.config)
                for position in range(3):
                    text(inputs_embeds=torch.zeros(1, 1, hidden_size, dtype=dtype, device=device), cache=cache,
                         use_cache=True, position_ids=torch.tensor([[position]], device=device))
                embeds = torch.zeros(1, length, hidden_size, dtype=dtype, device=device)
                mask = torch.ones(1, 3 + length, dtype=torch.long, device=device)
                positions = torch.arange(3, 3 + length, device=device)[None]
                mark = torch._dynamo.mark_dynamic
                mark(embeds, 1)
                mark(mask, 1)
                mark(positions, 1)
                for layer in cache.layers:
                    if not hasattr(layer, "conv_states"):  # full attention: keys and values grow with the prefix
                        mark(layer.keys, 2)
                        mark(layer.values, 2)
                run(embeds, mask, positions, cache)

        super().__init__(forward, compile, warm_up)

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        # The engine passes slices of its prompt-wide tensors, and the graphs guard on the strides of a tensor
        # of their own (`contiguous()` keeps a slice's stride over the one row: it is contiguous already).
        def own(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.clone(memory_format=torch.contiguous_format)

        return super().__call__(own(embeds), own(mask), own(positions), cache)

    def covers(self, rows: int, past: int, length: int) -> bool:
        """Whether a compiled graph runs a forward of `length` positions of `rows` prompts over `past`."""
        # A suffix exactly one chunk long needs no padding: neither graph covers 32 (their guards).
        return self.compiled and rows == 1 and past > 0 and 2 <= length <= SUFFIX_MAX and length not in SUFFIX_CHUNKS


def _mark_dynamic(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: SlotCache) -> None:
    """Trace the sizes that change from step to step as symbols (plain `dynamic=True` keeps the warm-up's)."""
    mark = torch._dynamo.mark_dynamic
    mark(cache._columns, 0)
    for store in (cache.keys, cache.values):
        for tensor in store.values():
            mark(tensor, 2)  # the cache's capacity
    if ids.shape[0] > 1:  # one row is a graph of its own
        for tensor in (ids, positions, cache._slots):
            mark(tensor, 0)
        mark(mask, 0)
        mark(mask, 3)
