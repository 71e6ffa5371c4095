"""Images and videos through HTTP on the running service (Ray Serve, router, tiny models).

The app at / accepts local paths under `media_dir` and fetches remote URLs (with the private
address guard on); the app at /single has the default media settings (both off).
"""

from __future__ import annotations

import openai
import pytest

from tests.unit.test_media import (
    data_url,
    gif_two_frames,
    image_bytes,
    require_encoder,
    solid_png,
    video_bytes,
)

CHAT = "/v1/chat/completions"
PNG_URL = data_url(image_bytes("PNG", (64, 48)), "image/png")
MP4 = video_bytes("mp4")  # 20 frames, 64x48, 10 fps: 2.0 s
VIDEO_MIME = {"mp4": "video/mp4", "mov": "video/quicktime", "mkv": "video/x-matroska", "webm": "video/webm",
              "avi": "video/x-msvideo"}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str, **sampling) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **sampling}}


def text(value: str = "what is this") -> dict:
    return {"type": "text", "text": value}


def chat(client, content: list[dict] | str, path: str = "", messages: list[dict] | None = None):
    messages = messages or [{"role": "user", "content": content}]
    return client.post(f"{path}{CHAT}", json={"model": "instruct", "max_tokens": 4, "messages": messages})


def prompt_tokens(response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- accepted inputs ----


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "bmp"])
def test_image_data_url_of_each_supported_format_is_answered(client, fmt):
    data = gif_two_frames((64, 48)) if fmt == "gif" else image_bytes(fmt.upper(), (64, 48))
    response = chat(client, [image(data_url(data, f"image/{fmt}")), text()])
    assert prompt_tokens(response) > prompt_tokens(chat(client, [text()])), f"the {fmt} image reached the prompt"
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_several_images_in_one_message_all_reach_the_prompt(client):
    one = prompt_tokens(chat(client, [image(PNG_URL), text()]))
    three = prompt_tokens(chat(client, [image(PNG_URL), image(PNG_URL), image(PNG_URL), text()]))
    assert three > one
    # Each image adds the same number of tokens.
    two = prompt_tokens(chat(client, [image(PNG_URL), image(PNG_URL), text()]))
    assert three - two == two - one > 0


def test_image_in_an_earlier_turn_then_assistant_then_text_turn_is_answered(client):
    def conversation(first: list[dict]) -> list[dict]:
        return [{"role": "user", "content": first},
                {"role": "assistant", "content": "A red rectangle."},
                {"role": "user", "content": "What colour was it?"}]

    with_image = prompt_tokens(chat(client, None, messages=conversation([image(PNG_URL), text()])))
    without = prompt_tokens(chat(client, None, messages=conversation([text()])))
    assert with_image > without, "the earlier turn's image stays in the prompt"


def test_mp4_video_data_url_is_answered_with_many_visual_tokens(client):
    with_video = prompt_tokens(chat(client, [video(data_url(MP4, "video/mp4")), text()]))
    text_only = prompt_tokens(chat(client, [text()]))
    with_image = prompt_tokens(chat(client, [image(PNG_URL), text()]))
    # Default sampling: 2 fps over 2.0 s = 4 frames; together more than two images' worth of tokens.
    assert with_video - text_only > 2 * (with_image - text_only)


@pytest.mark.parametrize("container", ["webm", "mkv", "mov", "avi"])
def test_video_data_url_of_each_other_container_is_answered(client, container):
    require_encoder(container)
    response = chat(client, [video(data_url(video_bytes(container), VIDEO_MIME[container])), text()])
    assert prompt_tokens(response) > prompt_tokens(chat(client, [text()]))


def test_video_url_fps_and_max_frames_reduce_the_sampled_frames(client):
    url = data_url(MP4, "video/mp4")
    default = prompt_tokens(chat(client, [video(url), text()]))
    fewer = prompt_tokens(chat(client, [video(url, fps=1, max_frames=2), text()]))
    assert fewer < default


def test_local_path_and_file_url_inside_media_dir_are_answered(client, media_dir):
    path = media_dir / "local.png"
    path.write_bytes(image_bytes("PNG", (64, 48)))
    text_only = prompt_tokens(chat(client, [text()]))
    for url in (str(path), path.as_uri(), "local.png"):
        assert prompt_tokens(chat(client, [image(url), text()])) > text_only, url


# ---- refused inputs ----


def test_local_path_outside_media_dir_is_refused(client, media_dir, tmp_path):
    outside = tmp_path / "outside.png"  # a real, valid image: only its place is wrong
    outside.write_bytes(image_bytes("PNG"))
    assert not outside.resolve().is_relative_to(media_dir.resolve())
    for url in (str(outside), outside.as_uri(), "/etc/hostname", "../outside.png"):
        error = error_of(chat(client, [image(url), text()]))
        assert error["code"] == "media_refused" and "outside the media directory" in error["message"], url


def test_url_to_a_loopback_address_is_refused_by_the_private_address_guard(client):
    error = error_of(chat(client, [image("http://127.0.0.1:1/x.png"), text()]))
    assert error["code"] == "media_refused"
    assert "private or local address" in error["message"]


def test_default_media_config_refuses_remote_urls_and_local_paths(client, media_dir):
    (media_dir / "single.png").write_bytes(image_bytes("PNG"))
    remote = error_of(chat(client, [image("http://example.com/cat.png"), text()], path="/single"))
    assert remote["code"] == "media_refused" and "Fetching image URLs is off" in remote["message"]
    local = error_of(chat(client, [image(str(media_dir / "single.png")), text()], path="/single"))
    assert local["code"] == "media_refused" and "Local image paths are off" in local["message"]
    # A data URL is still fine there.
    assert chat(client, [image(PNG_URL), text()], path="/single").status_code == 200


def test_corrupt_image_is_400_invalid_media(client):
    png = image_bytes("PNG", (200, 200))
    error = error_of(chat(client, [image(data_url(png[: len(png) // 2], "image/png")), text()]))
    assert error["code"] == "invalid_media" and "corrupt or truncated" in error["message"]


def test_truncated_video_is_400_invalid_media_not_a_server_error(client):
    mkv = video_bytes("mkv")
    error = error_of(chat(client, [video(data_url(mkv[: len(mkv) // 2], "video/x-matroska")), text()]))
    assert error["code"] == "invalid_media"


def test_tiff_image_is_400_naming_the_supported_formats(client):
    error = error_of(chat(client, [image(data_url(image_bytes("TIFF"), "image/tiff")), text()]))
    assert error["code"] == "invalid_media"
    assert "TIFF" in error["message"] and "PNG" in error["message"]


def test_more_images_than_the_limit_is_400_naming_the_limit(client):
    error = error_of(chat(client, [image(PNG_URL)] * 9 + [text()]))
    assert "9 images" in error["message"] and "limit is 8" in error["message"]
    assert chat(client, [image(PNG_URL)] * 8 + [text()]).status_code == 200


def test_image_over_the_pixel_limit_is_400_naming_the_limit(client):
    big = solid_png(7000, 7000)  # 49M pixels > the 40M default; small once compressed
    assert len(big) < 2 * 1024 * 1024
    error = error_of(chat(client, [image(data_url(big, "image/png")), text()]))
    assert error["code"] == "invalid_media"
    assert "49000000" in error["message"] and "40000000" in error["message"]


@pytest.mark.parametrize("part", [
    {"type": "image_url"},
    {"type": "image_url", "image_url": {}},
    {"type": "image_url", "image_url": "not-an-object"},
    {"type": "video_url", "video_url": {"url": PNG_URL, "fps": 0}},
])
def test_malformed_media_part_is_400(client, part):
    error = error_of(chat(client, [part, text()]))
    assert error["type"] == "invalid_request_error" and error["param"].startswith("messages.0.content")


def test_server_keeps_serving_after_a_burst_of_bad_media(client):
    png = image_bytes("PNG", (200, 200))
    mkv = video_bytes("mkv")
    bad = [  # each with the error code it must get
        ([image(data_url(png[:100], "image/png"))], "invalid_media"),
        ([image(data_url(image_bytes("TIFF"), "image/tiff"))], "invalid_media"),
        ([image("data:image/png;base64,@@@")], "invalid_media"),
        ([image("/etc/hostname")], "media_refused"),
        ([image("http://127.0.0.1:1/x.png")], "media_refused"),
        ([image("ftp://example.com/x.png")], "media_refused"),
        ([video(data_url(b"not a video at all", "video/mp4"))], "invalid_media"),
        ([video(data_url(mkv[: len(mkv) // 2], "video/x-matroska"))], "invalid_media"),
        ([{"type": "image_url"}], "invalid_request"),
    ]
    codes = [error_of(chat(client, [*content, text()]))["code"] for content, _ in bad]
    assert codes == [code for _, code in bad]
    assert prompt_tokens(chat(client, [image(PNG_URL), text()])) > 0


def test_openai_sdk_streams_an_answer_about_an_image(serve_url):
    sdk = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="x")
    stream = sdk.chat.completions.create(
        model="MiniCPM-V-4.6", max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [image(PNG_URL), text()]}], extra_body={"min_tokens": 6},
    )
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
