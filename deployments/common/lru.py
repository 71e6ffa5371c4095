"""A map bounded by the bytes of its values (no torch: the router uses it too)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

# (cache, event, amount): ("prefix" | "vision" | "decoded", "hit" | "miss" | "bytes" | "hit_tokens", value)
CacheObserver = Callable[[str, str, int], None]


def ignore_cache_event(cache: str, event: str, amount: int) -> None:
    pass


class ByteLRU:
    """A map bounded by the bytes of its values, evicting the least recently used first."""

    def __init__(self, name: str, budget: int, observe: CacheObserver = ignore_cache_event) -> None:
        self.name, self.budget, self._observe = name, budget, observe
        self._entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes, count: bool = True):
        """The value (now the most recently used), or None; counted as a hit or a miss unless `count` is off."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        if count:
            self._count(entry is not None)
        return None if entry is None else entry[0]

    def count(self, hit: bool) -> None:
        """Count one lookup that `get(..., count=False)` calls made up."""
        self._count(hit)

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self._observe(self.name, "hit" if hit else "miss", 1)

    def put(self, key: bytes, value, size: int) -> bool:
        """Store `value` (of `size` bytes), evicting older entries to fit; False when it alone exceeds the budget."""
        if size > self.budget:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and self.bytes + size > self.budget:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (value, size)
        self.bytes += size
        self._observe(self.name, "bytes", self.bytes)
        return True


def cache_state(cache: "BoundedCache") -> dict:
    """A cache's bytes, hits and misses, as `process_info()` reports them."""
    return {"bytes": cache.bytes, "hits": cache.stats[0], "misses": cache.stats[1]}


class BoundedCache:
    """A cache over one ByteLRU: whether it is on, the bytes it holds, its hits and misses."""

    _lru: ByteLRU

    @property
    def enabled(self) -> bool:
        return self._lru.budget > 0

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    @property
    def stats(self) -> tuple[int, int]:
        return self._lru.hits, self._lru.misses
