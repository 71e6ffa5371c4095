"""The prefix/vision cache keys (a prompt's layout) and the byte-bounded LRU, on synthetic ids."""

from __future__ import annotations

import numpy as np
from PIL import Image

from deployments.common.lru import ByteLRU
from deployments.engine.reuse import SpecialIds, layout
from deployments.common.types import Video

SPECIAL = SpecialIds(turn_end=9, media_start=7, image=5, video=6)
SLICE = 8  # a slice marker: not the media start, so a run after it continues the image before


def picture(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, 0, 0))


def clip(frames: int, value: int = 0) -> Video:
    return Video(np.full((frames, 4, 4, 3), value, np.uint8), 10.0, frames / 10, list(range(frames)), frames)


# user: image (2 units) + text | turn end | user: video of 2 frames + text | turn end | generation prompt
IDS = [1, 7, 5, 5, SLICE, 5, 5, 2, 9, 3, 7, 6, 6, 7, 6, 6, 4, 9, 11, 12]


def test_layout_finds_each_item_its_units_and_every_turn_end():
    found = layout(IDS, SPECIAL, [picture(1)], [clip(2)], "ns")
    image, video = found.media
    assert (image.kind, image.runs, image.first_unit, image.tokens) == ("image", [(2, 2), (5, 2)], 0, 4)
    assert (video.kind, video.runs, video.first_unit, video.tokens) == ("video", [(11, 2), (14, 2)], 0, 4)
    assert [position for position, _ in found.boundaries] == [9, 18]
    assert found.store_at == found.boundaries[-1]


def test_a_prefix_key_depends_on_the_pixels_of_the_media_before_it_and_only_those():
    a = layout(IDS, SPECIAL, [picture(1)], [clip(2, 0)], "ns")
    other_image = layout(IDS, SPECIAL, [picture(2)], [clip(2, 0)], "ns")
    other_video = layout(IDS, SPECIAL, [picture(1)], [clip(2, 9)], "ns")
    assert a.boundaries[0][1] != other_image.boundaries[0][1], "same ids, another picture: another prefix"
    assert a.boundaries[0][1] == other_video.boundaries[0][1], "the video comes after the first turn end"
    assert a.boundaries[1][1] != other_video.boundaries[1][1]
    assert layout(IDS, SPECIAL, [picture(1)], [clip(2, 0)], "ns").boundaries == a.boundaries, "deterministic"


def test_a_prefix_key_depends_on_every_id_before_it_and_on_the_namespace():
    a = layout(IDS, SPECIAL, [picture(1)], [clip(2)], "ns")
    changed = list(IDS)
    changed[10 + 6] = 40  # text after the video, inside the second turn
    b = layout(changed, SPECIAL, [picture(1)], [clip(2)], "ns")
    assert a.boundaries[0] == b.boundaries[0] and a.boundaries[1] != b.boundaries[1]
    assert layout(IDS, SPECIAL, [picture(1)], [clip(2)], "other").boundaries[0][1] != a.boundaries[0][1]


def test_a_turn_that_extends_the_chat_shares_the_earlier_turn_ends_keys():
    first = layout(IDS[:9] + [11, 12], SPECIAL, [picture(1)], [], "ns")
    second = layout(IDS, SPECIAL, [picture(1)], [clip(2)], "ns")
    assert first.store_at == second.boundaries[0]


def test_the_opening_of_each_user_turn_is_a_boundary_the_next_turn_shares():
    """`<|im_start|>user\n` as ids 13, 14: a boundary right after each occurrence, none for other roles; a
    prompt that resends the turn ends and the opening (a carried answer, then the next question) shares its key."""
    special = SpecialIds(turn_end=9, media_start=7, image=5, video=6, user_opening=(13, 14))
    # user opening, image, text | turn end | assistant opening (13, 15), answer | turn end | user opening, text...
    chat = [13, 14, 7, 5, 5, 2, 9, 13, 15, 3, 9, 13, 14, 4, 9, 13, 15]
    found = layout(chat, special, [picture(1)], [], "ns")
    assert [position for position, _ in found.boundaries] == [2, 7, 11, 13, 15]
    assert found.store_at == found.boundaries[-1], "the last user turn's end, not an opening"
    carried = layout(chat[:13] + [9, 13, 15], special, [picture(1)], [], "ns")  # that turn sent empty
    assert carried.boundaries[3] == found.boundaries[3]
    assert layout(chat, SPECIAL, [picture(1)], [], "ns").boundaries == [(7, found.boundaries[1][1]),
                                                                         (11, found.boundaries[2][1]),
                                                                         (15, found.boundaries[4][1])]


def test_placeholders_that_do_not_match_the_media_give_no_layout():
    assert layout(IDS, SPECIAL, [], [clip(2)], "ns") is None, "an image run without an image"
    assert layout(IDS, SPECIAL, [picture(1), picture(2)], [clip(2)], "ns") is None
    assert layout(IDS, SPECIAL, [picture(1)], [clip(3)], "ns") is None, "frames do not match the runs"


def test_a_prompt_ending_at_a_turn_end_has_nothing_to_store():
    found = layout([1, 2, 9], SPECIAL, [], [], "ns")
    assert found.boundaries == [(3, found.boundaries[0][1])] and found.store_at is None


def test_byte_lru_evicts_the_least_recently_used_to_stay_within_budget():
    events = []
    lru = ByteLRU("prefix", budget=100, observe=lambda *event: events.append(event))
    lru.put(b"a", "A", 40)
    lru.put(b"b", "B", 40)
    assert lru.get(b"a") == "A"  # now b is the least recently used
    lru.put(b"c", "C", 40)
    assert b"b" not in lru and b"a" in lru and b"c" in lru and lru.bytes == 80
    assert lru.get(b"b") is None
    assert (lru.hits, lru.misses) == (1, 1)
    assert not lru.put(b"huge", "H", 101) and lru.bytes == 80, "an entry over the budget is not stored"
    lru.put(b"a", "A2", 60)  # replacing an entry frees its old size first
    assert lru.bytes == 100 and lru.get(b"a") == "A2" and len(lru) == 2
    assert ("prefix", "hit", 1) in events and ("prefix", "miss", 1) in events and ("prefix", "bytes", 100) in events


def test_a_zero_budget_stores_nothing():
    lru = ByteLRU("vision", budget=0)
    assert not lru.put(b"a", "A", 1) and len(lru) == 0


def test_a_prompt_is_stored_when_it_adds_media_or_enough_tokens_or_resumed_from_a_snapshot():
    from deployments.engine.reuse import PrefixCache

    cache = PrefixCache(budget=1 << 20, min_tokens=8)
    with_media = layout(IDS, SPECIAL, [picture(1)], [clip(2)], "ns")
    assert cache.worth_storing(with_media) == with_media.store_at, "media since the start"
    assert cache.worth_storing(with_media, past=9) == with_media.store_at, "the video comes after position 9"
    assert cache.worth_storing(with_media, past=18) is None, "it resumed at the store point: nothing to store"
    text = layout([1] * 6 + [9] + [2] * 6 + [9, 3], SPECIAL, [], [], "ns")
    assert cache.worth_storing(text) == text.store_at, "14 tokens >= 8"
    assert cache.worth_storing(text, past=7) == text.store_at, "a chat that resumed is stored every turn"
    short = layout([1] * 3 + [9, 3], SPECIAL, [], [], "ns")
    assert short.store_at[0] == 4 and cache.worth_storing(short) is None, "4 tokens from the start, no media"


def test_without_every_turn_a_resumed_prompt_needs_enough_new_tokens():
    from deployments.engine.reuse import PrefixCache

    text = layout([1] * 6 + [9] + [2] * 6 + [9, 3], SPECIAL, [], [], "ns")
    cache = PrefixCache(budget=1 << 20, min_tokens=8, every_turn=False)
    assert cache.worth_storing(text, past=7) is None, "only 7 new tokens, no media"
    assert cache.worth_storing(text, past=0) == text.store_at


def test_the_longest_stored_prefix_before_a_position_and_whether_a_chat_is_held():
    import torch

    from deployments.engine.reuse import PrefixCache, Snapshot

    chat = layout([1] * 3 + [9] + [2] * 3 + [9] + [4] * 3 + [9, 3], SPECIAL, [], [], "ns")
    (first, first_key), (second, second_key), (third, third_key) = chat.boundaries
    cache = PrefixCache(budget=1 << 20)
    assert not cache.holds_chat(chat)

    def entry(length: int) -> Snapshot:
        return Snapshot(length, {0: torch.zeros(1, length, 2)}, {0: torch.zeros(1, length, 2)}, {}, {})

    cache.store(first_key, entry(first))
    cache.store(third_key, entry(third))
    assert cache.holds_chat(chat)
    assert cache.longest(chat).length == third and cache.stats == (1, 0)
    assert cache.longest(chat, before=third, count=False).length == first and cache.stats == (1, 0)
    assert cache.longest(chat, before=first, count=False) is None and cache.stats == (1, 0)
