"""The engine's own cache: one fixed slot per row, for the hybrid text tower of MiniCPM-V 4.6.

Qwen3.5's text tower mixes full-attention layers (keys/values that grow with the sequence) and
linear-attention layers (a conv state and a recurrent state of fixed size). `SlotCache` holds
them in preallocated tensors with a leading slot axis: rows being decoded occupy slots 0..n-1,
each row's keys/values start at column 0 of its slot, and `lengths[s]` says how many columns
slot s holds. A decode step writes each row's new key/value at its own column; nothing is
concatenated, per step or per join. A row that leaves is replaced by the last row (one copy),
so the running rows stay a prefix of the slots and every step works on views.

It implements the part of transformers' `Cache` interface the text tower calls during a
single-token decode step (`update`, the conv/recurrent state accessors); prompts are prefilled
into a regular `DynamicCache` and copied into a slot with `load`.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache


class SlotCache:
    """Keys/values and linear-attention states of up to `max_rows` rows, in fixed slots."""

    def __init__(self, config: PretrainedConfig, max_rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, conv_dtype: torch.dtype | None = None, initial_len: int = 256) -> None:
        self.max_rows, self.max_len = max_rows, max_len
        self.capacity = min(initial_len, max_len + 1)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)
        # The step being run: its slots 0..rows-1 and its columns 0..width-1, as tensors whose shapes say
        # how many (sizes a compiled step reads as symbols, where plain int attributes would recompile it).
        self._slots = torch.arange(0, device=device)
        self._columns = torch.arange(0, device=device)
        self._positions = self.lengths[:0]
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        kv_shape = (max_rows, config.num_key_value_heads, self.capacity, config.head_dim)
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim \
            + config.linear_num_value_heads * config.linear_value_head_dim
        for layer, kind in enumerate(config.layer_types):
            if kind == "full_attention":
                self.keys[layer] = torch.zeros(kv_shape, dtype=dtype, device=device)
                self.values[layer] = torch.zeros(kv_shape, dtype=dtype, device=device)
            else:
                self.conv[layer] = torch.zeros(max_rows, conv_dim, config.linear_conv_kernel_dim,
                                               dtype=conv_dtype or dtype, device=device)
                # The reference kernels keep the recurrent state in float32 whatever the weights' dtype.
                self.recurrent[layer] = torch.zeros(
                    max_rows, config.linear_num_value_heads, config.linear_key_head_dim,
                    config.linear_value_head_dim, dtype=torch.float32, device=device)

    @property
    def rows(self) -> int:
        """Slots in use by the step being run (and the running batch)."""
        return self._slots.shape[0]

    # ---- what the engine calls ----

    def ensure_capacity(self, length: int) -> None:
        """Make every slot able to hold `length` columns (doubling; a rare copy, never per step). One column
        more is always kept: a step's view of the keys is then never the whole tensor, the layout that a
        compiled step's graph was traced with."""
        if length < self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's limit of {self.max_len}")
        capacity = min(self.max_len + 1, max(length + 1, 2 * self.capacity))
        for store in (self.keys, self.values):
            for layer, old in store.items():
                grown = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                grown[:, :, : self.capacity] = old
                store[layer] = grown
        self.capacity = capacity

    def load(self, slot: int, prefilled: DynamicCache, row: int, start: int, length: int) -> None:
        """Copy row `row` of a prefilled cache (its columns start..start+length) into `slot`."""
        self.ensure_capacity(length)
        for layer, cache_layer in enumerate(prefilled.layers):
            if layer in self.keys:
                self.keys[layer][slot, :, :length] = cache_layer.keys[row, :, start : start + length]
                self.values[layer][slot, :, :length] = cache_layer.values[row, :, start : start + length]
            else:
                self.conv[layer][slot] = cache_layer.conv_states[0][row]
                self.recurrent[layer][slot] = cache_layer.recurrent_states[0][row]
        self.lengths[slot] = length

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (a leaving row's place goes to the last row)."""
        length = int(self.lengths[source])
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[target, :, :length] = tensor[source, :, :length]
        for store in (self.conv, self.recurrent):
            for tensor in store.values():
                tensor[target] = tensor[source]
        self.lengths[target] = length

    def begin_step(self, rows: int, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepare a decode step over slots 0..rows-1: their position ids (rows, 1) and the
        full-attention mask (rows, 1, 1, columns), None when every row has the same length (unless `masked`)."""
        positions = self.lengths[:rows]
        width = int(positions.max()) + 1
        self.ensure_capacity(width)
        self._positions = positions
        self._slots = torch.arange(rows, device=positions.device)
        self._columns = torch.arange(width, device=positions.device)
        mask = None
        if masked or int(positions.min()) != width - 1:
            mask = (self._columns[None, :] <= positions[:, None])[:, None, None, :]
        return positions[:, None].clone(), mask

    def end_step(self) -> None:
        self.lengths[: self.rows] += 1

    # ---- the Cache interface the text tower uses while decoding one token ----

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._slots, :, self._positions] = key_states[:, :, 0]
        values[self._slots, :, self._positions] = value_states[:, :, 0]
        rows, width = self._slots.shape[0], self._columns.shape[0]
        return keys[:rows, :, :width], values[:rows, :, :width]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv[layer_idx][: self.rows]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.recurrent[layer_idx][: self.rows]

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs) -> torch.Tensor:
        target = self.recurrent[layer_idx][: self.rows]
        target.copy_(state)
        return target

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def update_conv_state(self, *args, **kwargs):
        raise RuntimeError("SlotCache only decodes one token per step; prompts are prefilled in a DynamicCache")
