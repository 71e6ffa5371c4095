"""Images and videos by reference between router and replica: what the router replaces, what the replica
resolves, keeps and asks for again."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from deployments.common.digest import image_digest, stamp_image, stamp_video
from deployments.common.handoff import MediaMissing, MediaStore, SentMedia
from deployments.common.types import ChatMessage, GenerationRequest, MediaRef, Video


def _image(shade: int, size=(40, 30)) -> Image.Image:
    return stamp_image(Image.new("RGB", size, (shade, 20, 200)))


def _video(shade: int) -> Video:
    frames = np.full((2, 8, 8, 3), shade, dtype=np.uint8)
    return stamp_video(Video(frames, fps=2.0, duration=1.0, frame_indices=[0, 1], total_num_frames=2))


def _request(*parts) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", [*parts, "what is it?"]), ChatMessage("assistant", ["a box"]),
                              ChatMessage("user", ["and now?"])], enable_thinking=False, affinity="chat")


def _parts(request: GenerationRequest) -> list:
    return [part for message in request.messages for part in message.content if not isinstance(part, str)]


def test_the_router_sends_by_reference_only_what_it_handed_to_that_deployment():
    sent, old, new, clip = SentMedia(), _image(1), _image(2), _video(3)
    assert sent.by_reference("instruct", _request(old, clip)) is None, "nothing handed over yet"
    sent.remember("instruct", _request(old, clip))
    light = sent.by_reference("instruct", _request(old, new, clip))
    assert _parts(light) == [MediaRef("image", image_digest(old)), new, MediaRef("video", clip.digest)]
    assert light.affinity == "chat" and light.messages[0].content[-1] == "what is it?"
    assert sent.by_reference("thinking", _request(old)) is None, "another deployment's replicas never got it"
    sent.forget("instruct", _request(old))
    assert _parts(sent.by_reference("instruct", _request(old, clip))) == [old, MediaRef("video", clip.digest)]


def test_the_router_remembers_a_bounded_number_of_items():
    sent = SentMedia(capacity=2)
    images = [_image(shade) for shade in range(3)]
    for image in images:
        sent.remember("instruct", _request(image))
    assert sent.by_reference("instruct", _request(images[0])) is None, "the oldest was forgotten"
    assert _parts(sent.by_reference("instruct", _request(images[2]))) == [MediaRef("image", image_digest(images[2]))]


def test_a_replica_resolves_what_it_received_before_to_the_same_pixels():
    store, image, clip = MediaStore(1 << 20), _image(5), _video(6)
    assert store.resolve(_request(image, clip)) is not None
    light = SentMedia()
    light.remember("instruct", _request(image, clip))
    # As Ray carries it: pickled in the router, loaded in the replica.
    arrived = pickle.loads(pickle.dumps(light.by_reference("instruct", _request(image, clip))))
    resolved = _parts(store.resolve(arrived))
    assert np.array_equal(np.asarray(resolved[0]), np.asarray(image)) and image_digest(resolved[0]) == image_digest(image)
    assert resolved[1] is not None and np.array_equal(resolved[1].frames, clip.frames)
    assert store.stats == (2, 0)
    assert store.bytes == 40 * 30 * 3 + clip.frames.nbytes


def test_a_replica_keeps_its_own_copy_of_frames_it_received_as_a_view():
    """Ray hands large arrays over as read-only views of its object store: holding one would pin it there."""
    store, clip = MediaStore(1 << 20), _video(14)
    shared = clip.frames.copy()
    shared.flags.writeable = False
    view = shared[:]  # a view: owns no data, as an array deserialized from the object store
    store.resolve(_request(Video(view, 2.0, 1.0, [0, 1], 2, digest=clip.digest)))
    held = _parts(store.resolve(GenerationRequest([ChatMessage("user", [MediaRef("video", clip.digest)])], False)))[0]
    assert held.frames.flags.owndata and np.array_equal(held.frames, clip.frames)


def test_a_replica_asks_again_for_a_reference_it_lacks_and_keeps_nothing_of_that_request():
    store, held, lacking, new = MediaStore(1 << 20), _image(7), _image(8), _image(9)
    store.resolve(_request(held))
    request = GenerationRequest([ChatMessage("user", [MediaRef("image", image_digest(held)),
                                                      MediaRef("image", image_digest(lacking)), new])], False)
    assert store.resolve(request) == MediaMissing(1)
    assert store.stats == (1, 1)
    assert store.bytes == 40 * 30 * 3, "the new image of the refused request was not kept"
    wrong_kind = GenerationRequest([ChatMessage("user", [MediaRef("video", image_digest(held))])], False)
    assert store.resolve(wrong_kind) == MediaMissing(1)


def test_a_replica_keeps_the_most_recent_items_within_its_budget():
    store = MediaStore(2 * 40 * 30 * 3)
    images = [_image(shade) for shade in (10, 11, 12)]
    for image in images:
        store.resolve(_request(image))
    assert store.bytes == 2 * 40 * 30 * 3
    oldest, newest = (GenerationRequest([ChatMessage("user", [MediaRef("image", image_digest(image))])], False)
                      for image in (images[0], images[2]))
    assert store.resolve(oldest) == MediaMissing(1)
    assert _parts(store.resolve(newest)) == [images[2]]


def test_a_replica_without_a_store_asks_again_for_every_reference_and_passes_full_requests_through():
    store, image = MediaStore(0), _image(13)
    request = _request(image)
    assert store.resolve(request) is request and store.bytes == 0
    assert store.resolve(GenerationRequest([ChatMessage("user", [MediaRef("image", image_digest(image))])], False)) \
        == MediaMissing(1)
