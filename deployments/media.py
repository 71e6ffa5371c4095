"""Images and videos in requests: fetched and decoded safely before they reach a replica."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from deployments.errors import BadRequestError
from deployments.types import ContentPart


async def load(kind: str, url: str) -> ContentPart:
    """Decode one image or video named by `url`; raises BadRequestError for anything unusable."""
    if kind != "image":
        raise BadRequestError("Video input is not supported yet", param="messages")
    if not url.startswith("data:"):
        raise BadRequestError("Only data: URLs are accepted for images", param="messages")
    header, _, payload = url.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise BadRequestError("The image could not be decoded", param="messages") from exc
    return image.convert("RGB")
