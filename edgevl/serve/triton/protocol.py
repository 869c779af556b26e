"""What a request to the Triton model holds, and how it becomes Pipeline arguments.

One table (INPUTS, OUTPUTS) is the contract: `repository.py` writes it into config.pbtxt and `handler.py`
reads requests by it. Parsing takes plain numpy arrays (what `as_numpy()` gives), so it runs and is tested
without Triton.

Inputs (max_batch_size 0: one conversation per request; a scalar is a [1] tensor):

    messages            BYTES [1]    the OpenAI chat `messages` array as a JSON string (UTF-8): text parts,
                                     `image_url` / `video_url` parts holding base64 data URLs, and `{"type":
                                     "image"}` parts, filled in order from `images`
    images              BYTES [-1]   optional: encoded image files (PNG, JPEG, ...), no base64
    max_tokens          INT32 [1]    optional: most new tokens (default: the model's `default_max_tokens`)
    temperature         FP32 [1]     optional: 0..2, 0 = greedy
    top_p               FP32 [1]     optional: (0, 1]
    top_k               INT32 [1]    optional: >= 0, 0 = off
    repetition_penalty  FP32 [1]     optional: > 0
    seed                INT64 [1]    optional: 0..2^63-1
    stop                BYTES [-1]   optional: at most 16 stop strings
    stream              BOOL [1]     optional, decoupled models only: false = one response with the whole text

Sampling follows `edgevl serve`: temperature 0 is greedy; temperature, top_p or top_k given turn sampling on
(the others at OpenAI's defaults, top_k off); nothing given keeps the model's generation_config.json.

Outputs, in every response (streaming: the last three are "", [] and 0 until the last response):

    text_output         BYTES [1]    the new text: a streamed response's delta (the last one's is ""), or the
                                     whole text in a single response
    finish_reason       BYTES [1]    "eos", "stop" (a stop string) or "length"
    token_ids           INT64 [-1]   every generated token id
    prompt_tokens       INT64 [1]    the prompt's length in tokens
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
from dataclasses import dataclass, field

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.image_loading import ImageInput, ImageTooLarge, read_image_header
from edgevl.runtime.sampling import sampling_problem, show_value

MAX_STOP_STRINGS = 16
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image_url", "video_url", "image")


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str              # config.pbtxt's data_type
    dims: tuple[int, ...]
    optional: bool = False
    decoupled_only: bool = False
    help: str = ""


INPUTS = (
    TensorDecl("messages", "TYPE_STRING", (1,), help="OpenAI chat messages as a JSON string"),
    TensorDecl("images", "TYPE_STRING", (-1,), True, help="encoded image files for {\"type\": \"image\"} parts"),
    TensorDecl("max_tokens", "TYPE_INT32", (1,), True),
    TensorDecl("temperature", "TYPE_FP32", (1,), True),
    TensorDecl("top_p", "TYPE_FP32", (1,), True),
    TensorDecl("top_k", "TYPE_INT32", (1,), True),
    TensorDecl("repetition_penalty", "TYPE_FP32", (1,), True),
    TensorDecl("seed", "TYPE_INT64", (1,), True),
    TensorDecl("stop", "TYPE_STRING", (-1,), True),
    TensorDecl("stream", "TYPE_BOOL", (1,), True, decoupled_only=True),
)
OUTPUTS = (
    TensorDecl("text_output", "TYPE_STRING", (1,)),
    TensorDecl("finish_reason", "TYPE_STRING", (1,)),
    TensorDecl("token_ids", "TYPE_INT64", (-1,)),
    TensorDecl("prompt_tokens", "TYPE_INT64", (1,)),
)


def inputs(decoupled: bool) -> tuple[TensorDecl, ...]:
    return tuple(t for t in INPUTS if decoupled or not t.decoupled_only)


class RequestError(EdgevlError):
    """The client's request is wrong (Triton's INVALID_ARG); the message is one sentence for the client."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, from the model's config.pbtxt parameters."""

    default_max_tokens: int = 256
    max_image_pixels: int = 4096 * 4096      # per image and per video frame
    max_video_bytes: int = 24 * 1024 * 1024  # decoded bytes of one video data URL
    max_video_frames: int = 768              # frames sampled (at 2 fps) per video


@dataclass
class Request:
    """A parsed request: the chat template's messages, images and videos (headers read, nothing decoded), options."""

    messages: list[dict]
    images: list[ImageInput] = field(default_factory=list)   # in the order of their parts
    videos: list = field(default_factory=list)               # VideoInputs (`probe_video`), in order
    max_tokens: int = 256
    sampling: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = True


# ----------------------------------------------------------------------------- tensors -> values
def _one(name: str, array: np.ndarray):
    if array.size != 1:
        raise RequestError(f"{name} must hold one value, got a tensor of shape {list(array.shape)}.")
    return array.reshape(-1)[0]


def _text(name: str, value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{name} is not valid UTF-8 (byte {e.start}).") from None
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}.")
    _no_surrogates(name, value)
    return value


def _no_surrogates(where: str, text: str) -> None:
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            raise RequestError(f"{where} contains a lone UTF-16 surrogate (U+{ord(ch):04X}), which the tokenizer "
                               f"cannot encode.")


def _blobs(name: str, array: np.ndarray) -> list[bytes]:
    return [bytes(v) if isinstance(v, (bytes, np.bytes_)) else str(v).encode() for v in array.reshape(-1)]


def _number(name: str, array: np.ndarray, kind: type):
    value = _one(name, array)
    if kind is int:
        if not np.issubdtype(array.dtype, np.integer):
            raise RequestError(f"{name} must be an integer tensor, got {array.dtype}.")
        return int(value)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise RequestError(f"{name} must be a number tensor, got {array.dtype}.")
    return float(value)


def sampling_values(temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None) -> dict:
    """Request values -> Pipeline sampling keywords (the server's reading, plus top_k), each checked by the
    runtime's own rules; None = not given."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        problem = None if value is None else sampling_problem(name, value)
        if problem:
            raise RequestError(f"{name} {problem}, got {show_value(value)}.")
    opts: dict = {"seed": seed, "repetition_penalty": repetition_penalty}
    if temperature == 0:
        opts["do_sample"] = False
    elif temperature is not None or top_p is not None or top_k is not None:
        opts.update(do_sample=True, temperature=1.0 if temperature is None else temperature,
                    top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k)
    return opts


def parse_request(tensors: dict[str, np.ndarray], limits: Limits = Limits(), decoupled: bool = True) -> Request:
    """Input arrays by name (absent optional inputs left out) -> a Request; RequestError for a bad one."""
    if "messages" not in tensors:
        raise RequestError("the request has no messages input; send the chat messages as a JSON string.")
    blobs = _blobs("images", tensors["images"]) if "images" in tensors else []
    messages, images, videos = parse_messages(_text("messages", _one("messages", tensors["messages"])), blobs,
                                              limits)
    max_tokens = limits.default_max_tokens
    if "max_tokens" in tensors:
        max_tokens = _number("max_tokens", tensors["max_tokens"], int)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.")
    values = {}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float),
                       ("seed", int)):
        if name in tensors:
            values[name] = _number(name, tensors[name], kind)
    stop: tuple[str, ...] = ()
    if "stop" in tensors:
        strings = tensors["stop"].reshape(-1)
        if len(strings) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(strings)} strings; at most {MAX_STOP_STRINGS} are accepted.")
        stop = tuple(_text("stop", s) for s in strings)
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty.")
    stream = True
    if "stream" in tensors:
        if not decoupled:
            raise RequestError("this model is not decoupled, so it cannot stream; leave out the stream input.")
        value = _one("stream", tensors["stream"])
        if not isinstance(value, (bool, np.bool_)):
            raise RequestError(f"stream must be a BOOL tensor, got {tensors['stream'].dtype}.")
        stream = bool(value)
    return Request(messages, images, videos, max_tokens, sampling_values(**values), stop, stream and decoupled)


# ----------------------------------------------------------------------------- messages
def parse_messages(text: str, blobs: list[bytes] = (), limits: Limits = Limits()):
    """The JSON `messages` -> (chat-template messages, ImageInputs, VideoInputs): headers read and checked against
    the limits, no pixel decoded. `blobs` fill `{"type": "image"}` parts in order; every blob must be used."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise RequestError("messages is JSON nested too deeply.") from None
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise RequestError(f"messages is not valid JSON{where}.") from None
    if isinstance(data, dict) and "messages" in data:     # a whole chat-completions body: take its messages
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise RequestError("messages must be a non-empty JSON array of {\"role\", \"content\"} objects.")
    out, images, videos, blobs = [], [], [], list(blobs)
    for i, message in enumerate(data):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content.")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {show_value(role)}.")
        content = message.get("content")
        if isinstance(content, str):
            _no_surrogates(f"{where}.content", content)
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or an array of content parts.")
        parts = []
        for j, part in enumerate(content):
            parts.append(_part(f"{where}.content[{j}]", part, images, videos, blobs, limits))
        out.append({"role": role, "content": parts})
    if blobs:
        raise RequestError(f"the images input has {len(blobs)} more image(s) than the messages have "
                           f"{{\"type\": \"image\"}} parts.")
    return out, images, videos


def _part(where: str, part, images: list, videos: list, blobs: list, limits: Limits) -> dict:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        got = show_value(part.get("type")) if isinstance(part, dict) else "a " + type(part).__name__
        raise RequestError(f"{where} must be a content part with type {', '.join(PART_TYPES)}, got {got}.")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RequestError(f"{where}.text must be a string.")
        _no_surrogates(f"{where}.text", text)
        return {"type": "text", "text": text}
    if kind == "image":
        if not blobs:
            raise RequestError(f"{where} is an image part but the images input has no image left for it.")
        images.append(image_input(blobs.pop(0), f"image {len(images) + 1}", limits))
        return {"type": "image"}
    url = part.get(kind)
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise RequestError(f"{where}.{kind}.url must be a string (a base64 data URL).")
    media = kind.removesuffix("_url")
    data = read_data_url(url, media, where)
    if media == "image":
        images.append(image_input(data, f"image {len(images) + 1}", limits))
        return {"type": "image"}
    if importlib.util.find_spec("av") is None:
        raise RequestError("this model cannot decode video because PyAV is not installed in Triton's Python "
                           "environment; install it with `pip install 'edgevl[video]'`.")
    if len(data) > limits.max_video_bytes:
        raise RequestError(f"the video is {len(data)} bytes; this model accepts at most {limits.max_video_bytes} "
                           f"bytes per video.")
    videos.append(video_input(data, f"video {len(videos) + 1}", limits))
    return {"type": "video"}


def read_data_url(url: str, media: str, where: str) -> bytes:
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote {media} URLs are not fetched; send the {media} as a base64 data URL.")
    if not url.startswith("data:"):
        raise RequestError(f"{where}: the {media} must be a base64 data URL (data:{media}/...;base64,...); local "
                           f"paths are not read.")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError(f"{where}: {media} data URLs must be base64-encoded (data:{media}/...;base64,...).")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the {media} data URL is not valid base64.") from None


def image_input(data: bytes, label: str, limits: Limits) -> ImageInput:
    """An encoded image's header (size, EXIF orientation), checked against the pixel limit; decoded later."""
    try:
        return read_image_header(data, max_pixels=limits.max_image_pixels, label=label)
    except ImageTooLarge as e:
        size = f"{e.width}x{e.height} pixels" if e.width else "too many pixels"
        raise RequestError(f"{label} is {size}; this model accepts at most {limits.max_image_pixels} pixels per "
                           f"image.") from None
    except EdgevlError as e:   # not an image, an unknown format, ...
        raise RequestError(str(e)) from None


def video_input(data: bytes, label: str, limits: Limits):
    """A video file's header (frame size, count, rate), checked against the pixel limit; its frames are decoded
    later, only those the token budget keeps."""
    from edgevl.runtime.inputs.video import probe_video
    try:
        return probe_video(data, max_frames=limits.max_video_frames, max_pixels=limits.max_image_pixels, label=label)
    except EdgevlError as e:   # too large frames, undecodable, no frames
        raise RequestError(str(e)) from None
