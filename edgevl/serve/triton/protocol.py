"""What a request to the Triton model holds, and how its tensors become Pipeline arguments.

One table (INPUTS, OUTPUTS) is the contract: `repository.py` writes it into config.pbtxt and `handler.py`
reads requests by it. Reading takes plain numpy arrays (what `as_numpy()` gives), so it runs and is tested
without Triton. What the tensors hold is checked by the rules `edgevl serve` applies, with its sentences
(serve/requests.py: data URLs, image and video limits, roles, part types, stop strings, sampling values); what is
Triton's own is here: the tensors, the `messages` JSON (lenient: a whole chat-completions body is taken, a URL may
be a string) and the `images` tensor filling `{"type": "image"}` parts.

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

import json
from dataclasses import dataclass, field

import numpy as np

from edgevl.runtime.inputs.image_loading import ImageInput
from edgevl.runtime.sampling import show_value
from edgevl.serve.errors import RequestError
from edgevl.serve.requests import (
    MAX_STOP_STRINGS,
    PART_TYPES,
    ROLES,
    Media,
    RequestLimits,
    sampling_values,
    stop_problem,
    surrogate_problem,
)

BLOB_PART = "image"      # a part without a URL: its image is the next one of the `images` tensor


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
TRITON_LIMITS = RequestLimits(local_files_flag=None, who="this model")   # the defaults of the model's parameters


def inputs(decoupled: bool) -> tuple[TensorDecl, ...]:
    return tuple(t for t in INPUTS if decoupled or not t.decoupled_only)


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
    problem = surrogate_problem(text)
    if problem:
        raise RequestError(f"{where} {problem}.")


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


def _stop(array: np.ndarray) -> tuple[str, ...]:
    strings = array.reshape(-1)
    if len(strings) > MAX_STOP_STRINGS:      # before each is read
        raise RequestError(f"stop {stop_problem(strings)}.", param="stop")
    stop = tuple(_text("stop", s) for s in strings)
    problem = stop_problem(stop)
    if problem:
        raise RequestError(f"stop {problem}.", param="stop")
    return stop


def parse_request(tensors: dict[str, np.ndarray], limits: RequestLimits = TRITON_LIMITS,
                  decoupled: bool = True) -> Request:
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
    stop = _stop(tensors["stop"]) if "stop" in tensors else ()
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
def parse_messages(text: str, blobs: list[bytes] = (), limits: RequestLimits = TRITON_LIMITS):
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
    out, media, blobs = [], Media(limits), list(blobs)
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
        out.append({"role": role, "content": [_part(f"{where}.content[{j}]", part, media, blobs)
                                              for j, part in enumerate(content)]})
    if blobs:
        raise RequestError(f"the images input has {len(blobs)} more image(s) than the messages have "
                           f"{{\"type\": \"{BLOB_PART}\"}} parts.")
    return out, media.images, media.videos


def _part(where: str, part, media: Media, blobs: list[bytes]) -> dict:
    types = (*PART_TYPES, BLOB_PART)
    if not isinstance(part, dict) or part.get("type") not in types:
        got = show_value(part.get("type")) if isinstance(part, dict) else "a " + type(part).__name__
        raise RequestError(f"{where} must be a content part with type {', '.join(types)}, got {got}.")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RequestError(f"{where}.text must be a string.")
        _no_surrogates(f"{where}.text", text)
        return {"type": "text", "text": text}
    if kind == BLOB_PART:
        if not blobs:
            raise RequestError(f"{where} is an image part but the images input has no image left for it.")
        return media.image(blobs.pop(0), where)
    url = part.get(kind)
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise RequestError(f"{where}.{kind}.url must be a string (a base64 data URL).")
    return media.url_part(kind, url, f"{where}.{kind}")
