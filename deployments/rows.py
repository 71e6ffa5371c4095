"""Row operations on a running batch: its token ids, attention mask and the model's cache.

A batch being decoded is three things that must stay aligned row by row: the token ids so far
(`sequences`, left-padded; the last column is not yet in the cache), the attention mask (0 on
padding), and the transformers `Cache`. MiniCPM-V 4.6's text tower is hybrid: full-attention
layers keep keys/values of shape (rows, heads, length, dim) and linear-attention layers keep
fixed-size conv and recurrent states of shape (rows, ...). Rows are added by left-padding the
shorter side's keys/values with masked zeros (positions come from the mask, so a row's rotary
positions do not move) and concatenating states; rows are dropped by indexing every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer


def can_merge(cache: Cache) -> bool:
    """Whether every layer of `cache` is one whose rows this module knows how to add and drop."""
    return all(
        (isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer))
        or type(layer) is LinearAttentionLayer
        for layer in cache.layers
    )


@dataclass
class Rows:
    """Token ids, attention mask and cache of the rows being decoded together."""

    sequences: torch.Tensor  # (rows, width) prompt + generated ids, left-padded
    mask: torch.Tensor  # (rows, width), 0 on padding
    cache: Cache  # holds every column of `sequences` but the last

    @classmethod
    def after_generate(cls, mask: torch.Tensor, out) -> Rows:
        """The rows `generate` returned (`out`: sequences and cache), given the mask of the ids it started from."""
        grown = out.sequences.shape[1] - mask.shape[1]
        return cls(out.sequences, F.pad(mask, (0, grown), value=1), out.cache)

    @property
    def width(self) -> int:
        return self.sequences.shape[1]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), then drop leading columns that are padding in every row."""
        index = torch.tensor(rows, dtype=torch.long, device=self.sequences.device)
        self.sequences, self.mask = self.sequences[index], self.mask[index]
        for layer in self.cache.layers:
            if isinstance(layer, LinearAttentionLayer):
                layer.reorder_cache(index)
            else:
                layer.batch_select_indices(index)
        self._trim()

    def _trim(self) -> None:
        unused = int((self.width - self.mask.sum(dim=1)).min())
        if unused > 0:
            self.sequences, self.mask = self.sequences[:, unused:], self.mask[:, unused:]
            _pad_keys_values(self.cache, -unused)

    def extend(self, other: Rows, pad_token_id: int) -> None:
        """Append `other`'s rows below ours, padding the narrower side on the left."""
        width = max(self.width, other.width)
        for rows in (self, other):
            rows._pad_to(width, pad_token_id)
        self.sequences = torch.cat([self.sequences, other.sequences])
        self.mask = torch.cat([self.mask, other.mask])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if isinstance(mine, LinearAttentionLayer):
                for i in range(mine.number_of_states):
                    mine.conv_states[i] = torch.cat([mine.conv_states[i], theirs.conv_states[i]])
                    mine.recurrent_states[i] = torch.cat([mine.recurrent_states[i], theirs.recurrent_states[i]])
            elif mine.is_initialized:
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])

    def _pad_to(self, width: int, pad_token_id: int) -> None:
        extra = width - self.width
        if extra:
            self.sequences = F.pad(self.sequences, (extra, 0), value=pad_token_id)
            self.mask = F.pad(self.mask, (extra, 0), value=0)
            _pad_keys_values(self.cache, extra)


def _pad_keys_values(cache: Cache, columns: int) -> None:
    """Add `columns` zero columns on the left of every key/value tensor (or remove them, if negative)."""
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionLayer) or not layer.is_initialized:
            continue
        if columns > 0:
            layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
            layer.values = F.pad(layer.values, (0, 0, columns, 0))
        else:
            layer.keys, layer.values = layer.keys[..., -columns:, :], layer.values[..., -columns:, :]
