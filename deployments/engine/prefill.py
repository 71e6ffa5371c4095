"""A prompt forward, chunk by chunk, that snapshots the text tower at turn ends inside its chunks.

The hybrid text tower's linear-attention layers keep one conv and one recurrent state that sum up
every position before them, so a prefix snapshot can only be taken where a forward ends, or inside
one by `StateTaps`: each linear-attention module of the model runs its own forward once per segment
between the columns asked for, on the same cache (what separate forwards ending there would do to
that layer), and its states are copied at each column. Everything else (projections, MLPs, full
attention) runs once over the whole chunk, and the full-attention keys and values of any prefix are
slices of the cache afterwards. Storing a turn's end thus costs a second pass of the linear-attention
layers' own work (over the chunk's two parts) and a copy, not a second forward of the whole tower.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from deployments.engine.compiled import SUFFIX_CHUNKS
from deployments.engine.reuse import Layout, Snapshot
from deployments.engine.rows import Row

# The rows of one request: its n sequences share one prompt, prefilled once (the first row holds the inputs).
Family = list[Row]

# The linear-attention states of one row at one column: layer -> (conv state, recurrent state).
LinearStates = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AnswerJob:
    """A finished chat turn as its next turn will resend it: the prompt ids through the answer (and a blank
    user turn after it), their layout, and the (position, key) after that user turn's opening, to be stored."""

    ids: torch.Tensor  # (1, length)
    layout: Layout
    point: tuple[int, bytes]


class StateTaps:
    """Copies the linear-attention states of chosen rows at chosen columns of one forward (`at`).

    Installed once per model instance, on its linear-attention modules only. A forward of one position
    (every decode step, compiled or not) goes straight to the module's own forward, so nothing of this
    reaches the decode step's graphs. A forward of several positions (each segment, inside `at`) runs the
    reference kernel with a chunk sized to it (`kernel_chunk`); outside `at`, that is all it changes.
    Traced into a `SuffixForward` graph, it taps nothing and runs one chunk (`SUFFIX_CHUNKS`).
    """

    def __init__(self, text_model: torch.nn.Module) -> None:
        self._columns: dict[int, list[int]] = {}
        self._states: dict[tuple[int, int], LinearStates] = {}
        for layer in text_model.layers:
            module = getattr(layer, "linear_attn", None)
            if module is not None:
                module.forward = functools.partial(self._forward, module.forward, module.layer_idx)

    @contextlib.contextmanager
    def at(self, columns: dict[int, list[int]]) -> Iterator[dict[tuple[int, int], LinearStates]]:
        """Within this block, forwards copy the states of rows `columns[c]` after their first `c` positions
        (0 < c < the forward's length) into the yielded dict: (column, row) -> layer -> (conv, recurrent)."""
        self._columns, self._states = dict(sorted(columns.items())), {}
        try:
            yield self._states
        finally:
            self._columns = {}

    def _forward(self, inner: Callable, layer: int, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                 **kwargs) -> torch.Tensor:
        length = hidden_states.shape[1]
        if length == 1:
            return inner(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if torch.compiler.is_compiling():  # `SuffixForward`'s graphs: a symbolic length, one chunk, no taps
            chunk = next(size for size in SUFFIX_CHUNKS if length < size)  # a guard: one graph per size
            return inner(hidden_states, cache=cache, attention_mask=attention_mask, chunk_size=chunk, **kwargs)
        if not self._columns or cache is None:
            return inner(hidden_states, cache=cache, attention_mask=attention_mask, chunk_size=kernel_chunk(length),
                         **kwargs)
        outputs, start = [], 0
        for end in [*(c for c in self._columns if 0 < c < length), length]:
            mask = attention_mask[:, start:end] if attention_mask is not None else None
            outputs.append(inner(hidden_states[:, start:end], cache=cache, attention_mask=mask,
                                 chunk_size=kernel_chunk(end - start), **kwargs))
            if end < length:
                state = cache.layers[layer]
                for row in self._columns[end]:
                    self._states.setdefault((end, row), {})[layer] = (
                        state.conv_states[0][row].clone(), state.recurrent_states[0][row].clone())
            start = end
        return torch.cat(outputs, dim=1)


def kernel_chunk(length: int) -> int:
    """The chunk size for the reference (pure PyTorch) gated-delta-rule kernel over `length` positions.

    That kernel pads the positions to a multiple of its chunk (64 by default) and pays for whole chunks:
    a later turn's 28 positions cost 2.0 ms per linear-attention layer with chunks of 64, 1.1 ms with
    chunks of 32 (`small` preset, one CPU thread). The smallest power of two from 16 that covers the
    positions, at most 64. Optimised kernels (flash-linear-attention) take no chunk size: transformers
    drops the argument for them.
    """
    return min(64, max(16, 1 << (length - 1).bit_length()))


class Prefill:
    """The prompt forward of a group of newcomers, run chunk by chunk into a DynamicCache.

    `past` positions come from a prefix-cache snapshot (a group of one then): `embeds` holds the rest,
    `mask` and `positions` the whole width. `stores` (suffix column -> (family index, key)) names where
    each family's last turn ends, to be snapshotted for its chat's next turn as the chunk covering it runs.
    """

    def __init__(self, families: list[Family], embeds: torch.Tensor, mask: torch.Tensor, chunk: int,
                 config, past: Snapshot | None = None, stores: dict[int, list[tuple[int, bytes]]] | None = None
                 ) -> None:
        self.families, self.embeds, self.mask, self.chunk = families, embeds, mask, chunk
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=config)
        self.past = 0
        if past is not None:
            restore(self.cache, past)
            self.past = past.length
        self.stores = stores or {}
        self.offset = 0

    @property
    def rows(self) -> list[Row]:
        return [row for family in self.families for row in family]

    @property
    def done(self) -> bool:
        return self.offset >= self.embeds.shape[1]

    def next_chunk(self) -> tuple[int, int]:
        """The suffix columns the next forward covers."""
        start = self.offset
        return start, min(start + max(1, self.chunk // len(self.families)), self.embeds.shape[1])

    def stores_within(self, start: int, end: int) -> dict[int, list[tuple[int, bytes]]]:
        """The snapshots due after columns start+1..end, by column."""
        return {column: self.stores[column] for column in sorted(self.stores) if start < column <= end}

    def snapshot(self, family: int, length: int, column: int, linear: LinearStates | None) -> Snapshot:
        """Family `family`'s state after suffix column `column` (its first `length` prompt positions)."""
        return snapshot(self.cache, family, self.past + column, length, linear)


def snapshot(cache: DynamicCache, row: int, width: int, length: int, linear: LinearStates | None = None) -> Snapshot:
    """Row `row`'s state after cache column `width` (its first `length` prompt positions): keys and values
    sliced from the cache, linear-attention states from `linear` (what `StateTaps` copied inside the last
    forward), or from the cache when that forward ended at `width`."""
    keys, values, conv, recurrent = {}, {}, {}, {}
    for layer, cache_layer in enumerate(cache.layers):
        if not hasattr(cache_layer, "conv_states"):
            keys[layer] = cache_layer.keys[row, :, width - length : width].clone()
            values[layer] = cache_layer.values[row, :, width - length : width].clone()
        elif linear is not None:
            conv[layer], recurrent[layer] = linear[layer]
        else:
            conv[layer] = cache_layer.conv_states[0][row].clone()
            recurrent[layer] = cache_layer.recurrent_states[0][row].clone()
    return Snapshot(length, keys, values, conv, recurrent)


def restore(cache: DynamicCache, entry: Snapshot) -> None:
    """Fill an empty one-row DynamicCache with a snapshot, as if its prefix had just been prefilled."""
    for layer, cache_layer in enumerate(cache.layers):
        if layer in entry.conv:
            conv, recurrent = entry.conv[layer][None], entry.recurrent[layer][None]
            cache_layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent)
            cache_layer.conv_states[0].copy_(conv)
            cache_layer.recurrent_states[0].copy_(recurrent)
            cache_layer.has_previous_state[0] = True
        else:
            keys, values = entry.keys[layer][None], entry.values[layer][None]
            cache_layer.lazy_initialization(keys, values)
            cache_layer.keys, cache_layer.values = keys, values  # update() concatenates: the snapshot stays intact
