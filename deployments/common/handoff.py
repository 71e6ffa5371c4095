"""Images and videos a model replica already holds travel to it by digest, not as pixels.

A chat resends its images every turn. The router decodes each data URL once (its decoded-media
cache), but handing the pixels to a model replica is a copy through Ray on every turn: 12-19 ms for
a 1280x960 photo on a 2-core machine, tens of ms for a video's sampled frames. So:

- each model replica keeps the images and videos it received, by digest (`MediaStore`, LRU within
  `media_store_bytes` of host memory);
- the router remembers, per model deployment, the digests it handed over in full (`SentMedia`,
  a bounded count) and sends a later request's items that it handed over before as `MediaRef`s;
- a replica that lacks one (another replica got it, it was evicted, the replica restarted) answers
  the request with a single `MediaMissing` item before doing anything, and the router sends it again
  in full (a normal answer, not an error: a miss is no failure for the logs or the error metrics).

Nothing is sticky: a miss costs one round trip. A `MediaRef` only ever comes from the router, for an
item it holds decoded in this very request: the digest covers the decoded pixels and is cryptographic
(`deployments.common.digest`), so the stored item a replica substitutes is that same picture.
No torch here: the router imports this module.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from deployments.common.digest import image_digest, video_digest
from deployments.common.lru import BoundedCache, ByteLRU, CacheObserver, ignore_cache_event
from deployments.common.types import GenerationRequest, MediaRef, Video, media_nbytes


@dataclass(frozen=True)
class MediaMissing:
    """A replica's whole answer to a request that named, by reference, `count` items it does not hold: the
    router resends the request in full. Never reaches a client (a request in full cannot get it)."""

    count: int


def _digest(item: Image.Image | Video) -> bytes:
    return image_digest(item) if isinstance(item, Image.Image) else video_digest(item)


def _replace_parts(request: GenerationRequest, replace) -> GenerationRequest:
    """`request` with each image or video part replaced by `replace(part)`."""
    messages = [dataclasses.replace(message, content=[
        replace(part) if isinstance(part, (Image.Image, Video, MediaRef)) else part for part in message.content])
        for message in request.messages]
    return dataclasses.replace(request, messages=messages)


def media_of(request: GenerationRequest) -> list[Image.Image | Video]:
    """The request's images and videos, in order."""
    return [part for message in request.messages for part in message.content
            if isinstance(part, (Image.Image, Video))]


class MediaStore(BoundedCache):
    """A model replica's images and videos by digest (host memory, LRU by bytes); its hits and misses are the
    references resolved. Called from several request threads at once (keeping a video may copy its frames)."""

    def __init__(self, budget: int, observe: CacheObserver = ignore_cache_event) -> None:
        self._lru = ByteLRU("media", budget, observe)
        self._lock = threading.Lock()

    def resolve(self, request: GenerationRequest) -> GenerationRequest | MediaMissing:
        """The request with its references replaced by the items they name; its full items are kept for later
        requests. MediaMissing (and nothing kept) when an item referenced is not here."""
        refs = [part for message in request.messages for part in message.content if isinstance(part, MediaRef)]
        with self._lock:
            found = {ref.digest: self._lru.get(ref.digest) for ref in refs}
        missing = [ref for ref in refs if found[ref.digest] is None or _kind(found[ref.digest]) != ref.kind]
        if missing:
            return MediaMissing(len(missing))
        for item in media_of(request):
            size = media_nbytes(item)
            if size <= self._lru.budget:  # else put() would drop it: no copy for nothing
                kept = _owned(item)
                with self._lock:
                    self._lru.put(_digest(item), kept, size)
        return _replace_parts(request, lambda part: found[part.digest] if isinstance(part, MediaRef) else part) \
            if refs else request


def _owned(item: Image.Image | Video) -> Image.Image | Video:
    """The item with pixels of its own: Ray hands a large array over as a read-only view of its object
    store, which holding it would pin there (images arrive as copies already)."""
    if isinstance(item, Video) and not item.frames.flags.owndata:
        return dataclasses.replace(item, frames=item.frames.copy())
    return item


def _kind(item: Image.Image | Video) -> str:
    return "image" if isinstance(item, Image.Image) else "video"


class SentMedia:
    """What a router handed to each model deployment in full: (deployment, digest) pairs, the most recent
    `capacity` of them."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._sent: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def by_reference(self, deployment: str, request: GenerationRequest) -> GenerationRequest | None:
        """The request with every item handed to `deployment` before as a MediaRef; None when there is none."""
        items = media_of(request)
        if not any((deployment, _digest(item)) in self._sent for item in items):
            return None

        def light(part):
            digest = _digest(part)
            return MediaRef(_kind(part), digest) if (deployment, digest) in self._sent else part

        return _replace_parts(request, light)

    def remember(self, deployment: str, request: GenerationRequest) -> None:
        """`request`'s items reached a replica of `deployment` in full (or were found there)."""
        for item in media_of(request):
            key = (deployment, _digest(item))
            self._sent[key] = None
            self._sent.move_to_end(key)
        while len(self._sent) > self._capacity:
            self._sent.popitem(last=False)

    def forget(self, deployment: str, request: GenerationRequest) -> None:
        """A replica of `deployment` lacked some of `request`'s items."""
        for item in media_of(request):
            self._sent.pop((deployment, _digest(item)), None)
