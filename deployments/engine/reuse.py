"""Reusing what earlier requests computed in this replica: prefix, vision-feature and processor caches.

Every turn of a chat resends the whole conversation. Bounded caches (LRU by bytes) let a turn
skip what the turn before already computed:

- `ProcessorCache`: the image and video processors' output (resized, sliced, normalised pixels)
  per image or video, keyed by its digest and the call's options.

- `VisionCache`: the vision tower's output for one image or video, keyed by a digest of its
  decoded pixels and the processing options. A hit skips the vision tower for that item.
- `PrefixCache`: the text tower's state at the end of a user turn: the full-attention keys and
  values of every position before it, and the linear-attention conv and recurrent states at that
  position (the hybrid model cannot resume from an arbitrary position: those states summarise
  the whole prefix, so they are snapshotted exactly at turn ends, or after the opening of the user
  turn that follows, where the next turn's prompt will resume). A request whose prompt starts with
  a stored prefix prefills only the rest.

Keys: a prompt's `Layout` hashes its token ids with the digest of each image or video spliced in
where its placeholders start (placeholder ids are the same for every image, so ids alone would
let two pictures share an entry). The hash is cryptographic, so no client can craft a prompt that
collides with another's entry. The caches live in the engine of one loaded checkpoint and the
keys are namespaced by it, so nothing is shared across a change of checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from deployments.common.digest import frames_digest, image_digest, video_digest
from deployments.common.lru import BoundedCache, ByteLRU, CacheObserver, ignore_cache_event
from deployments.common.types import Video

# ---- what a prompt is made of ----


@dataclass
class MediaItem:
    """One image or video of a prompt: its pixels' digest and its placeholder runs (one per unit: the
    image or frame itself and each slice), as (start, length) in the prompt and in the kind's unit order."""

    kind: str  # "image" | "video"
    digest: bytes
    runs: list[tuple[int, int]]
    first_unit: int  # index of its first unit among the prompt's units of this kind

    @property
    def start(self) -> int:
        return self.runs[0][0]

    @property
    def tokens(self) -> int:
        return sum(length for _, length in self.runs)


@dataclass
class Layout:
    """A prompt's media items (in prompt order per kind) and, at each turn end and after each user turn's
    opening, the prefix key there."""

    length: int
    media: list[MediaItem]
    boundaries: list[tuple[int, bytes]] = field(default_factory=list)  # (position, key), increasing

    @property
    def store_at(self) -> tuple[int, bytes] | None:
        """The last turn end before the generation prompt: where the next turn of this chat will resume."""
        return self.boundaries[-1] if self.boundaries and self.boundaries[-1][0] < self.length else None


@dataclass(frozen=True)
class SpecialIds:
    """The token ids a layout reads: turn ends, the image/frame start marker, the two placeholders, and the
    ids that open a user turn (`<|im_start|>user\n`; empty: no boundary there)."""

    turn_end: int
    media_start: int
    image: int
    video: int
    user_opening: tuple[int, ...] = ()


def layout(ids: Sequence[int] | torch.Tensor, special: SpecialIds, images: list[Image.Image], videos: list[Video],
           namespace: str) -> Layout | None:
    """The layout of one prompt, or None when its placeholders do not match its media (nothing is cached then)."""
    ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    media: list[MediaItem] = []
    for kind, token, items, units_per_item in (
        ("image", special.image, images, None),
        ("video", special.video, videos, [len(v.frames) for v in videos]),
    ):
        runs = _runs(ids, token)
        starts = [i for i, (start, _) in enumerate(runs) if start > 0 and ids[start - 1] == special.media_start]
        # An image starts at a run after the start marker (its slices follow); a video at the first of its frames.
        if units_per_item is not None:
            if len(starts) != sum(units_per_item):
                return None
            offsets = np.cumsum([0, *units_per_item[:-1]]).tolist()
            starts = [starts[offset] for offset in offsets] if items else []
        if len(starts) != len(items) or (runs and (not starts or starts[0] != 0)):
            return None
        ends = [*starts[1:], len(runs)]
        digest = image_digest if kind == "image" else video_digest
        for item, first, end in zip(items, starts, ends):
            media.append(MediaItem(kind, digest(item), runs[first:end], first))
    media.sort(key=lambda item: item.start)
    result = Layout(int(len(ids)), media)
    h = hashlib.blake2b(namespace.encode(), digest_size=16)
    ends = [int(p) + 1 for p in np.flatnonzero(ids == special.turn_end)]
    events = sorted([(item.start, 0, item) for item in media]
                    + [(p, 1, None) for p in sorted({*ends, *_after(ids, special.user_opening)})],
                    key=lambda event: event[:2])
    position = 0
    for at, is_boundary, item in events:
        h.update(ids[position:at].tobytes())
        position = at
        if is_boundary:
            result.boundaries.append((at, h.copy().digest()))
        else:
            h.update(b"\0media:" + item.kind.encode() + item.digest)
    return result


def _after(ids: np.ndarray, run: tuple[int, ...]) -> list[int]:
    """The positions right after each occurrence of the id sequence `run` in `ids`."""
    if not run or len(ids) < len(run):
        return []
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(run))
    return [int(p) + len(run) for p in np.flatnonzero((windows == np.asarray(run)).all(axis=1))]


def _runs(ids: np.ndarray, token: int) -> list[tuple[int, int]]:
    """Maximal runs of `token` in `ids`, as (start, length)."""
    hit = np.concatenate([[False], ids == token, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return [(int(start), int(end - start)) for start, end in zip(edges[::2], edges[1::2])]


# ---- the caches ----


@dataclass
class Snapshot:
    """The text tower's state after `length` prompt positions of one sequence."""

    length: int
    keys: dict[int, torch.Tensor]  # full-attention layer -> (kv_heads, length, head_dim)
    values: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]  # linear-attention layer -> conv state
    recurrent: dict[int, torch.Tensor]  # linear-attention layer -> recurrent state

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for store in (self.keys, self.values, self.conv, self.recurrent) for t in store.values())


class PrefixCache(BoundedCache):
    """Snapshots of the text tower at turn ends, bounded in bytes.

    Storing costs memory and, inside the prefill forward, a second pass of each linear-attention
    layer's recurrence (`deployments/engine/prefill.py`): wasted on a prompt that no later turn extends, as
    most one-shot API requests. So a prompt is stored when its last turn ends `min_tokens` or more past
    where it resumed from, when that part holds an image or video (vision work a later turn must not
    redo), and, with `every_turn`, whenever it resumed from a snapshot (its chat came back, so its next
    turn will likely come too). Without `every_turn`, the engine stores a chat's later turns itself, by
    prefilling each answer once it has nothing else to run (`EngineCore.carry_answer`).
    """

    def __init__(self, budget: int, observe: CacheObserver = ignore_cache_event, min_tokens: int = 1,
                 every_turn: bool = True) -> None:
        self._lru = ByteLRU("prefix", budget, observe)
        self._observe = observe
        self.min_tokens, self.every_turn = min_tokens, every_turn

    def worth_storing(self, prompt: Layout, past: int = 0) -> tuple[int, bytes] | None:
        """Where to snapshot `prompt` (resumed from position `past`) for its chat's next turn, or None."""
        point = prompt.store_at
        if point is None or point[0] <= past or point[1] in self._lru:
            return None
        new_media = any(past <= item.start < point[0] for item in prompt.media)
        resumed = self.every_turn and past > 0
        return point if resumed or new_media or point[0] - past >= self.min_tokens else None

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru

    def longest(self, prompt: Layout, before: int | None = None, count: bool = True) -> Snapshot | None:
        """The snapshot of the longest stored prefix of `prompt` that ends before position `before` (by
        default its length: one position must remain to prefill, for the logits of the first token);
        counted as one hit or miss unless `count` is off."""
        for position, key in reversed(prompt.boundaries):
            if position >= (prompt.length if before is None else before):
                continue
            snapshot = self._lru.get(key, count=False)
            if snapshot is not None:
                if count:
                    self._lru.count(True)
                    self._observe("prefix", "hit_tokens", snapshot.length)
                return snapshot
        if count:
            self._lru.count(False)
        return None

    def holds_chat(self, prompt: Layout) -> bool:
        """Whether a prefix of `prompt` is stored: its chat is one this cache follows."""
        return any(key in self._lru for _, key in prompt.boundaries)

    def store(self, key: bytes, snapshot: Snapshot) -> None:
        self._lru.put(key, snapshot, snapshot.nbytes)


class VisionCache(BoundedCache):
    """The vision tower's features per image or video, bounded in bytes."""

    def __init__(self, budget: int, observe: CacheObserver = ignore_cache_event) -> None:
        self._lru = ByteLRU("vision", budget, observe)

    @staticmethod
    def key(item: MediaItem, options: str) -> bytes:
        return item.kind.encode() + b":" + options.encode() + b":" + item.digest

    def get(self, item: MediaItem, options: str) -> torch.Tensor | None:
        return self._lru.get(self.key(item, options))

    def put(self, item: MediaItem, options: str, features: torch.Tensor) -> None:
        self._lru.put(self.key(item, options), features, features.numel() * features.element_size())


class ProcessorCache(BoundedCache):
    """The image and video processors' output per item (resized, sliced and normalised pixels with their
    grids), kept in host memory under one budget, keyed by the item's digest and the call's options, so an
    image or a video a chat resends every turn is processed once. `install` wraps a checkpoint's
    processors; the outputs of several items are merged as the processor packs a batch (pixels along
    their last axis, the rest along the first). Called from several request threads at once."""

    def __init__(self, budget: int, observe: CacheObserver = ignore_cache_event) -> None:
        self._lru = ByteLRU("processor", budget, observe)
        self._lock = threading.Lock()

    def install(self, processor) -> None:
        for name, video in (("image_processor", False), ("video_processor", True)):
            if getattr(processor, name, None) is not None:
                setattr(processor, name, _CachingMediaProcessor(getattr(processor, name), self, video=video))

    def process(self, inner, items: list, digests: list[bytes], kwargs: dict, per_item: dict[str, list]):
        """inner(items, **kwargs), item by item through the cache; `per_item` names the kwargs that hold
        one value per item (each call gets its own, and it is part of that item's key)."""
        from transformers.image_processing_utils import BatchFeature

        shared = {name: value for name, value in kwargs.items() if name not in per_item}
        options = repr(sorted(shared.items())).encode()
        keys, calls = [], []
        for i, digest in enumerate(digests):
            own = {name: [values[i]] for name, values in per_item.items()}
            keys.append(hashlib.blake2b(options + repr(own).encode() + digest, digest_size=16).digest())
            calls.append(shared | own)
        with self._lock:
            outputs = [self._lru.get(key, count=_counting.get()) for key in keys]
        for i, key in enumerate(keys):
            if outputs[i] is None:
                outputs[i] = inner([items[i]], **calls[i])
                size = sum(v.numel() * v.element_size() for v in outputs[i].values() if isinstance(v, torch.Tensor))
                with self._lock:
                    self._lru.put(key, outputs[i], size)
        merged = {}
        for name in outputs[0].keys():
            values = [output[name] for output in outputs]
            if isinstance(values[0], torch.Tensor):
                merged[name] = torch.cat(values, dim=-1 if name.startswith("pixel_values") else 0)
            else:
                merged[name] = [item for value in values for item in value]
        return BatchFeature(merged)


class _CachingMediaProcessor:
    """A checkpoint's image or video processor with its output per item cached in a `ProcessorCache`;
    calls it cannot key (other input types, per-item options it does not know) go to the processor."""

    def __init__(self, inner, cache: ProcessorCache, video: bool) -> None:
        self.inner, self.cache, self.video = inner, cache, video

    def __getattr__(self, name: str):  # everything else is the wrapped processor's
        return getattr(self.inner, name)

    def __call__(self, items, **kwargs):
        flat = _flatten(items)
        if not self.video:
            if not flat or not all(isinstance(image, Image.Image) for image in flat):
                return self.inner(items, **kwargs)
            return self.cache.process(self.inner, flat, [image_digest(image) for image in flat], kwargs, {})
        metadata = kwargs.get("video_metadata")
        keyable = flat and all(isinstance(v, np.ndarray) and v.ndim == 4 for v in flat) \
            and isinstance(metadata, list) and len(metadata) == len(flat)
        if not keyable:
            return self.inner(items, **kwargs)
        known = _known_videos.get()
        digests = [video_digest(known[id(frames)]) if id(frames) in known else frames_digest(frames) for frames in flat]
        return self.cache.process(self.inner, flat, digests, kwargs, {"video_metadata": metadata})


# Whether processor-cache lookups count as hits and misses: not for the engine's own renders (a carried
# answer's), which would otherwise show on the dashboard as hits no request made.
_counting: contextvars.ContextVar[bool] = contextvars.ContextVar("counting", default=True)


@contextlib.contextmanager
def uncounted():
    """Within this block, processor-cache lookups are not counted as hits or misses."""
    token = _counting.set(False)
    try:
        yield
    finally:
        _counting.reset(token)


# The videos of the prompt being rendered, by the id of their frames array (alive, so ids are unique):
# the engine sets them around the processor call, so a video the router already hashed is not hashed again.
_known_videos: contextvars.ContextVar[dict[int, Video]] = contextvars.ContextVar("known_videos", default={})


@contextlib.contextmanager
def known_videos(videos: Sequence[Video]):
    """Within this block, the processor cache keys each of these videos' frames by the video's digest."""
    token = _known_videos.set({id(video.frames): video for video in videos})
    try:
        yield
    finally:
        _known_videos.reset(token)


def _flatten(images) -> list:
    """The images of a processor call, in order (one list per sample, or one flat list, or one image)."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]
