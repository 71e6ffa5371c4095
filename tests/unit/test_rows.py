"""Adding and dropping rows of a running batch: ids, mask and a hybrid (key/value + linear-attention) cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from deployments.rows import Rows, can_merge

PAD = 0


def rows_of(lengths: list[int], tag: float) -> Rows:
    """Rows with prompts of `lengths` tokens (left-padded), one column generated and not yet cached.

    Every cached value of row r equals tag + r, so tests can tell rows apart after they move.
    """
    width = max(lengths) + 1
    mask = torch.stack([torch.cat([torch.zeros(width - n - 1), torch.ones(n + 1)]) for n in lengths]).long()
    sequences = torch.where(mask.bool(), torch.arange(1, width + 1).expand(len(lengths), -1), PAD)
    fill = (tag + torch.arange(len(lengths), dtype=torch.float)).view(-1, 1, 1, 1)
    attention, linear = DynamicLayer(), LinearAttentionLayer()
    keys = fill.expand(-1, 2, width - 1, 4) * mask[:, None, :-1, None]
    attention.update(keys, keys.clone())
    linear.update_conv_state(fill[..., 0].expand(-1, 3, 4).clone())
    linear.update_recurrent_state(fill.expand(-1, 2, 4, 4).clone())
    return Rows(sequences, mask, Cache(layers=[attention, linear]))


def row_tags(rows: Rows) -> list[float]:
    attention, linear = rows.cache.layers
    tags = [float(linear.recurrent_states[0][r].max()) for r in range(rows.sequences.shape[0])]
    assert tags == [float(linear.conv_states[0][r].max()) for r in range(len(tags))]
    assert tags == [float(attention.keys[r].max()) for r in range(len(tags))]
    return tags


def test_extend_left_pads_the_narrower_rows_and_keeps_every_row_aligned():
    rows, newcomers = rows_of([5, 3], tag=10), rows_of([8], tag=20)
    rows.extend(newcomers, PAD)
    assert rows.sequences.shape == rows.mask.shape == (3, 9)
    assert rows.cache.layers[0].keys.shape == (3, 2, 8, 4)  # one column fewer than the ids: the last is uncached
    assert rows.mask.sum(dim=1).tolist() == [6, 4, 9]
    assert rows.sequences[0].tolist() == [PAD] * 3 + [1, 2, 3, 4, 5, 6]  # the same ids, moved right
    assert torch.all(rows.cache.layers[0].keys[0, :, :2] == 0)  # padded keys are zeros under a zero mask
    assert row_tags(rows) == [10, 11, 20]


def test_select_drops_rows_then_the_columns_that_only_padding_used():
    rows = rows_of([2, 7, 4], tag=0)
    rows.select([0, 2])
    assert row_tags(rows) == [0, 2]
    assert rows.sequences.shape == (2, 5), "the 7-token row left; its 3 extra columns went with it"
    assert rows.cache.layers[0].keys.shape[2] == 4
    assert rows.mask.sum(dim=1).tolist() == [3, 5]
    assert rows.mask[:, -1].tolist() == [1, 1]


def test_select_can_reorder_and_keeps_width_while_the_longest_row_stays():
    rows = rows_of([2, 7], tag=0)
    rows.select([1, 0])
    assert row_tags(rows) == [1, 0] and rows.sequences.shape == (2, 8)


def test_only_key_value_and_linear_attention_layers_can_be_merged():
    assert can_merge(Cache(layers=[DynamicLayer(), LinearAttentionLayer()]))
    assert not can_merge(Cache(layers=[DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]))
