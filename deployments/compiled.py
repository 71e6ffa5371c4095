"""One decode step of the text tower, eager or compiled with `torch.compile` (inductor).

An eager decode step on a CPU spends about as long launching the text tower's ~1000 small
operations (norms, gates, rotary, the linear-attention recurrences) as reading its weights;
inductor fuses them. The compiled step is the model's own forward, traced on the engine's
`SlotCache`: every size that changes from step to step (rows, columns, cache capacity) reaches
it as a tensor's shape, so one graph serves them all. Two graphs in all: a step of one row
(the row-adaptive linear layers take their one-row path there, and no mask is needed) and a
step of several rows (always masked, so that rows of equal and unequal lengths share it).

Compiling takes tens of seconds on a small CPU, so it never happens under the running rows' feet:
a background thread builds both graphs at start on a scratch cache while the engine decodes
eagerly, and the engine switches to them once they exist. After that a step that would need a
new graph (a guard no warm-up step met) runs eagerly instead of compiling, and a compiled step
that raises ends its rows and turns compiling off for the replica's later steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from deployments.slots import SlotCache

logger = logging.getLogger("ray.serve")

# One compile at a time in a process, and never a compiled step during another engine's compile: the
# stance a compiled step runs under is process-wide, and would turn that compile into an eager run.
_COMPILE_LOCK = threading.Lock()


class DecodeStep:
    """Logits (rows, vocab) of the next token of each running row, from its last token and the cache."""

    # What a compiled step does when its graphs do not fit the call (tests make it fail instead).
    fallback = "eager_on_recompile"

    def __init__(self, text: torch.nn.Module, lm_head: torch.nn.Module, compile: bool,
                 scratch_cache: Callable[[], SlotCache]) -> None:
        def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: SlotCache) -> torch.Tensor:
            hidden = text(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                          attention_mask={"full_attention": mask, "linear_attention": None}).last_hidden_state
            return lm_head(hidden[:, -1])

        self._eager = step
        self._compiled: Callable | None = None
        self.compiled_steps = 0  # steps run by a compiled graph
        self.warm_up_s: float | None = None  # how long building the graphs took, once done
        self.error: Exception | None = None  # why compiling, or a compiled step, failed, if one did
        self._thread: threading.Thread | None = None
        if compile:
            # Guards on the modules' attributes cost about 1 ms per step and protect nothing: the
            # engine never changes its model's modules.
            graphs = torch.compile(step, dynamic=True,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            self._thread = threading.Thread(target=self._warm_up, args=(graphs, scratch_cache),
                                            name="decode-compile", daemon=True)
            self._thread.start()

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled now (both graphs are built)."""
        return self._compiled is not None

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the warm-up ended (built or failed); whether steps run compiled now."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.compiled

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: SlotCache) -> torch.Tensor:
        compiled = self._compiled
        if compiled is not None and _COMPILE_LOCK.acquire(blocking=False):
            try:
                with torch.compiler.set_stance(self.fallback):
                    logits = compiled(ids, positions, mask, cache)
                self.compiled_steps += 1
                return logits
            except Exception as exc:
                # This step's rows fail (a half-run graph may have moved their states); the next steps run
                # eagerly, so that a fault of the compiled graphs cannot fail every step of the replica.
                self._compiled, self.error = None, exc
                logger.error("The compiled decode step failed; decoding eagerly from now on", exc_info=exc)
                raise
            finally:
                _COMPILE_LOCK.release()
        return self._eager(ids, positions, mask, cache)

    def _warm_up(self, graphs: Callable, scratch_cache: Callable[[], SlotCache]) -> None:
        """Build the one-row and the several-row graph by running them on a scratch cache."""
        started = time.monotonic()
        try:
            with torch.inference_mode():  # as the engine runs: guards check it
                cache = scratch_cache()
                for rows in (1, 2):
                    cache.lengths[:rows] = torch.arange(3, 3 + rows)  # unequal lengths: the masked path
                    positions, mask = cache.begin_step(rows, masked=rows > 1)
                    ids = torch.zeros(rows, 1, dtype=torch.long, device=positions.device)
                    _mark_dynamic(ids, positions, mask, cache)
                    with _COMPILE_LOCK:
                        graphs(ids, positions, mask, cache)
        except Exception as exc:  # no C++ compiler, an operator inductor cannot lower...: decode eagerly
            self.error = exc
            logger.warning("Compiling the decode step failed; decoding eagerly", exc_info=exc)
            return
        self.warm_up_s = time.monotonic() - started
        self._compiled = graphs
        logger.info("Decode step compiled in %.0f s; decoding with the compiled graphs", self.warm_up_s)


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
