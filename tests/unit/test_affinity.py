"""Chat affinity: the home replica of a chat (rendezvous hashing) and the chat's affinity key."""

from __future__ import annotations

from collections import Counter

from deployments.replica.affinity import home_order
from deployments.ingress.protocol import affinity
from deployments.ingress.schemas import ChatCompletionRequest

REPLICAS = ["a1b2", "c3d4", "e5f6"]


def test_a_key_always_has_the_same_home_and_keys_spread_over_the_replicas():
    homes = Counter(REPLICAS[home_order(f"chat-{i}", REPLICAS)[0]] for i in range(3000))
    assert home_order("chat-7", REPLICAS) == home_order("chat-7", list(REPLICAS))
    assert sorted(home_order("chat-7", REPLICAS)) == [0, 1, 2]
    assert all(800 < count < 1200 for count in homes.values()), homes


def test_when_a_replica_leaves_only_the_chats_homed_on_it_move():
    keys = [f"chat-{i}" for i in range(1000)]
    before = {key: REPLICAS[home_order(key, REPLICAS)[0]] for key in keys}
    remaining = [r for r in REPLICAS if r != "c3d4"]
    after = {key: remaining[home_order(key, remaining)[0]] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == "c3d4" for key in moved)
    # ...and each of those goes to its second choice before the departure.
    assert all(after[key] == REPLICAS[home_order(key, REPLICAS)[1]] for key in moved)


def body(*messages, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": list(messages), **extra})


def test_every_turn_of_a_chat_has_the_affinity_of_its_opening():
    system = {"role": "system", "content": "be brief"}
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                         {"type": "text", "text": "what is it?"}]}
    turn1 = body(system, first)
    turn3 = body(system, first, {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "colour?"},
                 {"role": "assistant", "content": "grey"}, {"role": "user", "content": "name?"})
    assert affinity(turn1) == affinity(turn3)
    other_image = dict(first, content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
                                       {"type": "text", "text": "what is it?"}])
    assert affinity(body(system, other_image)) != affinity(turn1)
    assert affinity(body({"role": "system", "content": "be long"}, first)) != affinity(turn1)
    assert affinity(body(first)) != affinity(turn1)


def test_without_a_key_both_of_two_replicas_get_requests():
    """Serve takes the first of equally loaded candidates: the order must be random, not the list's."""
    import asyncio

    from deployments.replica.affinity import ChatAffinityRouter

    router = ChatAffinityRouter.__new__(ChatAffinityRouter)  # choose_replicas reads no router state without a key
    replicas = ["first", "second"]
    firsts = Counter(asyncio.run(router.choose_replicas(replicas, None))[0][0] for _ in range(200))
    assert set(firsts) == {"first", "second"}


def test_a_keyed_request_goes_home_first_unless_home_has_a_full_batch():
    import asyncio
    from types import SimpleNamespace

    from deployments.replica.affinity import ChatAffinityRouter

    from collections import namedtuple

    ReplicaId = namedtuple("ReplicaId", "unique_id")
    replicas = [SimpleNamespace(replica_id=ReplicaId(name)) for name in REPLICAS]
    request = SimpleNamespace(args=[SimpleNamespace(affinity="chat-1")])
    home = replicas[home_order("chat-1", REPLICAS)[0]]
    queues: dict = {}
    router = ChatAffinityRouter.__new__(ChatAffinityRouter)
    router.initialize_state(busy_requests=8)
    router._use_replica_queue_len_cache = True
    router._replica_queue_len_cache = SimpleNamespace(get=queues.get)

    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert ranks[0] == [home] and home not in ranks[1] and len(ranks[1]) == 2
    queues[home.replica_id] = 8  # a full batch running at home: the others first, home last
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert home not in ranks[0] and ranks[-1] == [home]
