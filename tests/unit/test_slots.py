"""The engine's slot cache, on a hand-built hybrid cache: rows load into slots, the last row fills a freed
slot, each row writes its own column, and the mask covers exactly each row's columns."""

from __future__ import annotations

import torch
from transformers import Qwen3_5TextConfig
from transformers.cache_utils import DynamicCache

from deployments.engine.slots import SlotCache

CONFIG = Qwen3_5TextConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
    linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=4, linear_value_head_dim=4,
    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"], vocab_size=16,
)


def prefilled(rows: int, length: int, fill: float) -> DynamicCache:
    cache = DynamicCache(config=CONFIG)
    kv = torch.full((rows, 1, length, 4), fill)
    cache.update(kv, kv + 1, 1)
    cache.layers[0].update_conv_state(torch.full((rows, 12, 4), fill), conv_kernel_size=4)
    cache.layers[0].update_recurrent_state(torch.full((rows, 1, 4, 4), fill))
    return cache


def slots(max_rows: int = 4, initial_len: int = 4) -> SlotCache:
    return SlotCache(CONFIG, max_rows, max_len=64, dtype=torch.float32, device=torch.device("cpu"),
                     initial_len=initial_len)


def test_load_copies_only_the_rows_columns_and_its_states():
    cache = slots()
    cache.load(2, prefilled(2, 5, fill=3.0), row=1, start=2, length=3)
    assert cache.lengths.tolist() == [0, 0, 3, 0]
    assert (cache.keys[1][2, :, :3] == 3.0).all() and (cache.keys[1][2, :, 3:] == 0).all()
    assert (cache.values[1][2, :, :3] == 4.0).all()
    assert (cache.conv[0][2] == 3.0).all() and (cache.recurrent[0][2] == 3.0).all()


def test_capacity_grows_without_losing_what_slots_hold():
    cache = slots(initial_len=4)
    cache.load(0, prefilled(1, 3, fill=1.0), 0, 0, 3)
    cache.load(1, prefilled(1, 9, fill=2.0), 0, 0, 9)
    assert cache.capacity >= 9
    assert (cache.keys[1][0, :, :3] == 1.0).all() and (cache.keys[1][1, :, :9] == 2.0).all()


def test_move_puts_the_last_row_in_a_freed_slot():
    cache = slots()
    cache.load(0, prefilled(1, 2, fill=1.0), 0, 0, 2)
    cache.load(1, prefilled(1, 3, fill=2.0), 0, 0, 3)
    cache.move(1, 0)
    assert cache.lengths[0] == 3 and (cache.keys[1][0, :, :3] == 2.0).all() and (cache.conv[0][0] == 2.0).all()


def test_a_step_writes_each_rows_key_at_its_own_position_and_masks_the_rest():
    cache = slots()
    cache.load(0, prefilled(1, 2, fill=1.0), 0, 0, 2)
    cache.load(1, prefilled(1, 3, fill=2.0), 0, 0, 3)
    positions, mask = cache.begin_step(2)
    assert positions.tolist() == [[2], [3]]
    assert mask[:, 0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    new = torch.tensor([7.0, 8.0]).view(2, 1, 1, 1).expand(2, 1, 1, 4)
    keys, _ = cache.update(new, new, layer_idx=1)
    assert keys.shape == (2, 1, 4, 4)
    assert (keys[0, :, 2] == 7.0).all() and (keys[1, :, 3] == 8.0).all() and (keys[0, :, 3] == 0).all()
    cache.end_step()
    assert cache.lengths[:2].tolist() == [3, 4]


def test_rows_of_equal_length_need_no_mask():
    cache = slots()
    for slot in (0, 1):
        cache.load(slot, prefilled(1, 3, fill=1.0), 0, 0, 3)
    assert cache.begin_step(2)[1] is None


def test_recurrent_state_updates_write_through_to_the_slots():
    cache = slots()
    cache.load(0, prefilled(1, 2, fill=1.0), 0, 0, 2)
    cache.begin_step(1)
    cache.update_recurrent_state(torch.full((1, 1, 4, 4), 5.0), layer_idx=0)
    assert (cache.recurrent[0][0] == 5.0).all() and (cache.recurrent[0][1] == 0).all()
