"""What crosses the router -> replica boundary: messages keep their images exactly, RGB ones as arrays."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from deployments.common.digest import DIGEST_KEY, stamp_image
from deployments.common.types import ChatMessage, Video


def photo(mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return stamp_image(Image.fromarray(pixels).convert(mode))


def test_a_message_round_trips_its_images_text_and_videos():
    rgb, grey = photo(), photo("L")
    video = Video(np.zeros((2, 8, 8, 3), np.uint8), 10.0, 0.2, [0, 1], 2, b"d")
    message = ChatMessage("user", ["look", rgb, grey, video], reasoning=None, tool_calls=[{"name": "f", "arguments": {}}])
    back = pickle.loads(pickle.dumps(message, protocol=5))
    assert back.role == "user" and back.tool_calls == message.tool_calls and back.content[0] == "look"
    for before, after in zip((rgb, grey), back.content[1:3]):
        assert isinstance(after, Image.Image)
        assert (after.mode, after.size) == (before.mode, before.size)
        assert np.array_equal(np.asarray(after), np.asarray(before))
        assert after.info[DIGEST_KEY] == before.info[DIGEST_KEY]
    assert np.array_equal(back.content[3].frames, video.frames) and back.content[3].digest == b"d"


def test_rgb_pixels_travel_as_one_out_of_band_buffer():
    """Ray passes pickle-5 buffers without copying them through the pickle stream."""
    image = photo()
    buffers = []
    stream = pickle.dumps(ChatMessage("user", [image]), protocol=5, buffer_callback=buffers.append)
    assert [memoryview(b).nbytes for b in buffers] == [40 * 30 * 3]
    assert len(stream) < 1000
    back = pickle.loads(stream, buffers=buffers)
    assert np.array_equal(np.asarray(back.content[0]), np.asarray(image))
