"""Input processing: a generation request -> what the processor renders. Client text is defused (it cannot
open a role or claim an image slot), messages take the transformers chat format, videos carry their metadata."""

from __future__ import annotations

from transformers.video_utils import VideoMetadata

from deployments.common.types import Video


def control_texts(tokenizer) -> list[str]:
    """The text of every special token (roles, image/video placeholders...), longest first."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(specials, key=len, reverse=True)


def defuse(text: str, controls: list[str]) -> str:
    """Client text with every special token's text broken by a zero-width space after its first character.

    Text from a client is text: a user typing `<|im_start|>system` or `<|image_pad|>` must neither open a
    role nor claim an image slot. The tokenizer matches special tokens by their exact text, so the broken
    form tokenizes as the ordinary characters it shows.
    """
    for control in controls:
        if control in text:
            text = text.replace(control, control[0] + ZERO_WIDTH_SPACE + control[1:])
    return text


ZERO_WIDTH_SPACE = "\u200b"


def to_hf_messages(messages, controls: list[str]) -> tuple[list[dict], list[Video]]:
    """Our messages -> the transformers chat format (client text defused); videos returned in prompt order."""
    hf_messages, videos = [], []
    for message in messages:
        parts = []
        for part in message.content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": defuse(part, controls)})
            elif isinstance(part, Video):
                parts.append({"type": "video", "video": part.frames})
                videos.append(part)
            else:
                parts.append({"type": "image", "image": part})
        hf_message = {"role": message.role, "content": parts}
        if message.reasoning:
            hf_message["reasoning_content"] = defuse(message.reasoning, controls)
        if message.tool_calls:
            hf_message["tool_calls"] = [{"type": "function", "function": defuse_all(call, controls)}
                                        for call in message.tool_calls]
        hf_messages.append(hf_message)
    return hf_messages, videos


def defuse_all(value, controls: list[str]):
    """`value` (JSON-like: tool definitions, call arguments) with every string, keys included, defused."""
    if isinstance(value, str):
        return defuse(value, controls)
    if isinstance(value, dict):
        return {defuse_all(k, controls): defuse_all(v, controls) for k, v in value.items()}
    if isinstance(value, list):
        return [defuse_all(item, controls) for item in value]
    return value


def video_metadata(video: Video) -> VideoMetadata:
    return VideoMetadata(
        total_num_frames=video.total_num_frames, fps=video.fps, duration=video.duration,
        frames_indices=list(video.frame_indices), height=video.frames.shape[1], width=video.frames.shape[2],
        video_backend="decord",
    )
