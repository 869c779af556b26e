"""What a client sends, checked and turned into the runtime's inputs: the body parsed and validated (one sentence
per problem), OpenAI messages -> the chat template's content lists, images' and videos' headers read (pixel and
byte limits, sizes for the token budget); their pixels are decoded later, on the scheduler's preparing thread.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.image_loading import ImageInput, ImageTooLarge, read_image_header
from edgevl.serve.scheduler.jobs import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
from edgevl.runtime.inputs.budget import MAX_FRAMES
from edgevl.runtime.inputs.video import VideoInput, VideoTooLarge, probe_video
from edgevl.serve.connections import DEFAULT_BODY_TIMEOUT_S
from edgevl.serve.errors import ApiError, clip, sentence
from edgevl.serve.schemas import ChatCompletionRequest, FieldProblem
from edgevl.serve.tools import message_tool_fields

_UNION_TAG = re.compile(r"[\[\]()]|^[A-Z]")


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096            # per image, and per video frame
    allow_local_files: bool = False
    # Decoded bytes of one video data URL: 24 MiB is the most a default 32 MiB request holds in base64.
    max_video_bytes: int = 24 * 1024 * 1024
    max_video_frames: int = MAX_FRAMES             # frames sampled per video (at 2 fps), as `--max-frames`
    max_batch: int = DEFAULT_MAX_BATCH             # requests decoded together (KV-cache rows), `--max-batch`
    max_queue: int = DEFAULT_MAX_QUEUE             # more requests accepted while the rows are busy; then 429
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK     # prompt tokens per prefill call while other rows decode
    prefix_cache: bool = False                     # finished rows keep their KV for prompts that share it
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # the whole request body within this, else a 408 (RequestBodyLimit)


def read_url(url: str, kind: str, limits: ServerLimits) -> bytes | Path:
    """An image/video URL -> the bytes of a base64 data URL or, when allowed, a local path / file:// URL."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{kind} data URLs must be base64-encoded (data:{kind}/...;base64,...).")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"the {kind} data URL is not valid base64.") from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"remote {kind} URLs are not fetched; send the {kind} as a base64 data URL.")
    if not limits.allow_local_files:
        raise ApiError(400, f"local {kind} paths are disabled; start the server with --allow-local-files "
                            f"or send a base64 data URL.")
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise ApiError(400, f"{kind} file {path} does not exist.")
    return path


def image_input(url: str, limits: ServerLimits) -> ImageInput:
    """A data URL (base64) or, when allowed, a local path / file:// URL -> its header (size, EXIF orientation),
    checked against the pixel limit; its pixels are decoded later by the runtime's `load_image`."""
    source = read_url(url, "image", limits)
    try:
        return read_image_header(source, max_pixels=limits.max_image_pixels, label="the image data")
    except ImageTooLarge as e:
        size = f"{e.width}x{e.height} pixels" if e.width else "too many pixels"
        raise ApiError(413, f"the image is {size}; this server accepts at most {limits.max_image_pixels} "
                            f"pixels per image.", code="image_too_large") from None
    except EdgevlError as e:  # not an image, an unknown format, ...
        raise ApiError(400, str(e)) from None


def _have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def video_input(url: str, limits: ServerLimits) -> VideoInput:
    """A video URL -> its header (frame size, count and rate), checked against the byte and pixel limits; its
    frames are decoded later, only those the token budget keeps."""
    if not _have_pyav():   # 400, not 501: OpenAI clients retry 5xx, and a retry cannot help
        raise ApiError(400, "this server cannot decode video because PyAV is not installed; install it with "
                            "`pip install 'edgevl[video]'`.", code="video_unsupported")
    source = read_url(url, "video", limits)
    if isinstance(source, bytes) and len(source) > limits.max_video_bytes:
        raise ApiError(413, f"the video is {len(source)} bytes; this server accepts at most "
                            f"{limits.max_video_bytes} bytes per video.", code="video_too_large")
    try:
        return probe_video(source, max_frames=limits.max_video_frames, max_pixels=limits.max_image_pixels,
                           label="the video" if isinstance(source, bytes) else None)
    except VideoTooLarge as e:
        raise ApiError(413, str(e), code="video_too_large") from None
    except EdgevlError as e:  # undecodable, no frames, ...
        raise ApiError(400, str(e)) from None


def to_hf_messages(request: ChatCompletionRequest,
                   limits: ServerLimits) -> tuple[list[dict], list[ImageInput], list[VideoInput]]:
    """OpenAI messages -> the chat template's content-list format, the images and the videos (headers read,
    nothing decoded: run it off the event loop, it reads files and parses containers)."""
    messages, images, videos = [], [], []
    for i, m in enumerate(request.messages):
        extra = message_tool_fields(i, m)         # an assistant turn's tool_calls, a tool turn's tool_call_id
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content or "", **extra})
            continue
        content = []
        for part in m.content:
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
            elif part.type == "image_url":
                if part.image_url is None:
                    raise ApiError(400, "an image_url content part has no image_url.")
                images.append(image_input(part.image_url.url, limits))
                content.append({"type": "image"})
            else:
                if part.video_url is None:
                    raise ApiError(400, "a video_url content part has no video_url.")
                videos.append(video_input(part.video_url.url, limits))
                content.append({"type": "video"})
        messages.append({"role": m.role, "content": content, **extra})
    return messages, images, videos


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The raw request body -> a validated request; every problem is an ApiError(400) with one sentence."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); JSON must be UTF-8.") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply.") from None
    except ValueError as e:   # JSONDecodeError, and int() refusing numbers of thousands of digits
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{where}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {_json_kind(data)}.")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_api_error(e.errors()) from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply.") from None


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def validation_api_error(errors: list) -> ApiError:
    """pydantic's first error -> one sentence naming the field (`messages.0.content`, `temperature`).

    For a union (`content`: a string or a list of parts) pydantic reports every member; the deepest
    error under the first error's field is the member the value was meant for."""
    def path(error) -> list[str]:
        loc = [str(p) for p in error.get("loc", ())]
        return loc[1:] if loc[:1] == ["body"] else loc          # FastAPI's prefix
    field = path(errors[0])[:1]
    first = max((e for e in errors if path(e)[:1] == field), key=lambda e: len(path(e)))
    # Union members appear in the path as type names ("str", "list[ContentPart]", "function-after[...]").
    loc = [p for p in path(first) if not (_UNION_TAG.search(p) or p in ("str", "int", "float", "bool"))]
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, FieldProblem) and error.field:   # a check of several fields names the one it is about
        loc.append(error.field)
    where = ".".join(loc) or "the request body"
    if isinstance(error, FieldProblem):   # the shared validation's own words (sampling values, text)
        return ApiError(400, sentence(f"{where} {error}"), param=where)
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{clip(where)} is not a field this server knows; it takes OpenAI's chat-completions "
                             f"fields, and refuses the ones it does not implement.", param=where)
    return ApiError(400, sentence(f"{clip(where)}: {first.get('msg', 'invalid value')}"), param=where)
