"""Chat affinity: the turns of one chat go to the model replica that holds its caches.

A model replica keeps the prefix and vision-feature caches of the chats it served
(`deployments.engine.reuse`); a later turn only benefits on that replica. This Ray Serve request router
(it runs wherever a handle to a model deployment routes, i.e. in the router replicas) gives each
chat a home replica by rendezvous hashing of the chat's affinity key (a digest of its opening
messages, which every later turn resends unchanged) with the replica ids: stateless, the same in
every router replica and after any restart, and when a replica joins or leaves only the chats
homed on it move. A request goes to its home unless the home is busy (its known queue at
`busy_requests` or more, or full), then to the less loaded of two other replicas, as Serve's
default router would. Nothing is sticky: a request routed elsewhere only misses the caches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def home_order(key: str, replica_ids: Sequence[str]) -> list[int]:
    """Indices of `replica_ids` from the key's home to its last choice (rendezvous hashing)."""
    scores = [hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest() for replica in replica_ids]
    return sorted(range(len(replica_ids)), key=scores.__getitem__, reverse=True)


def affinity_key(pending_request: PendingRequest | None) -> str | None:
    """The `affinity` of the GenerationRequest being routed, if any."""
    if pending_request is None:
        return None
    for arg in pending_request.args:
        key = getattr(arg, "affinity", None)
        if isinstance(key, str) and key:
            return key
    return None


class ChatAffinityRouter(RequestRouter):
    """Routes each chat to its home replica (see the module docstring); requests without an affinity key
    (and every request when the deployment has one replica) by power of two choices."""

    def initialize_state(self, busy_requests: int | None = None) -> None:
        """`busy_requests`: the queue length at which a home counts as busy (default: when it is full)."""
        self._busy_requests = busy_requests

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = affinity_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [_two(candidate_replicas)]
        order = home_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        home, others = candidate_replicas[order[0]], [candidate_replicas[i] for i in order[1:]]
        if self._busy(home):
            return [_two(others), [home]]
        return [[home], _two(others)]

    def _busy(self, replica: RunningReplica) -> bool:
        if self._busy_requests is None or not self._use_replica_queue_len_cache:
            return False  # Serve itself skips a full home (it rejects), then tries the next rank
        queue = self._replica_queue_len_cache.get(replica.replica_id)
        return queue is not None and queue >= self._busy_requests


def _two(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two at random, in random order (Serve takes the one with the shorter queue, the first on a tie)."""
    return random.sample(replicas, min(2, len(replicas)))
