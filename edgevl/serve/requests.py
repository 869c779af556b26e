"""One reading of a chat request for the OpenAI server (serve/app.py) and the Triton model (serve/triton/): the rules
both apply and the sentences both answer with, whatever carried the request (a JSON body, Triton's tensors).

    RequestLimits     what one request may hold: the server's flags, or a Triton model's config.pbtxt parameters
    read_url          an image/video URL -> the bytes of its base64 data URL, or a local path where allowed
    Media             a request's images and videos in the order of their parts: headers read and checked against
                      the limits as each part comes; pixels are decoded later, on the scheduler's preparing
                      thread, and only what the token budget keeps
    ROLES, PART_TYPES, surrogate_problem, stop_problem, sampling_value_problem: the rules for roles, content
                      parts, text, stop strings and sampling values (each problem worded to follow the field's name)
    sampling_values   a request's sampling values -> the Pipeline's sampling keywords (temperature 0 = greedy, ...)

The server reads its JSON body with pydantic (schemas.py, body.py), the Triton model its tensors (triton/protocol.py):
both check what they read by these rules, and both turn image_url / video_url parts into inputs with `Media`.

A bad request is a RequestError (serve/errors.py): one sentence, the HTTP status and OpenAI code the server answers
with, and where it is in the request; the Triton model answers INVALID_ARG with the same sentence. Nothing here
imports pydantic or FastAPI: a Triton model's Python has only edgevl's own dependencies.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import MAX_FRAMES
from edgevl.runtime.inputs.image_loading import ImageInput, ImageTooLarge, read_image_header
from edgevl.runtime.inputs.video import VideoInput, VideoTooLarge, probe_video
from edgevl.runtime.sampling import sampling_problem, show_value
from edgevl.serve.errors import RequestError

ROLES = ("system", "user", "assistant")     # the server also takes "tool" turns (their tool_call_id, schemas.py)
PART_TYPES = ("text", "image_url", "video_url")   # video_url is not OpenAI's: it is the part vLLM takes for video
MAX_STOP_STRINGS = 16
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold, and its reply's length when it does not say."""

    max_image_pixels: int = 4096 * 4096            # per image, and per video frame
    # Decoded bytes of one video data URL: 24 MiB is the most a default 32 MiB request holds in base64.
    max_video_bytes: int = 24 * 1024 * 1024
    max_video_frames: int = MAX_FRAMES             # frames sampled per video (at 2 fps)
    default_max_tokens: int = 256                  # new tokens when a request gives no max_tokens
    allow_local_files: bool = False                # image/video URLs that are paths on this machine
    local_files_flag: str | None = "--allow-local-files"   # what allows them (None: nothing, as in a Triton model)
    who: str = "this server"                       # how refusals name what refuses ("this model" in Triton)


def read_url(url: str, kind: str, limits: RequestLimits, where: str | None = None) -> bytes | Path:
    """An image/video URL -> the bytes of a base64 data URL or, when allowed, a local path / file:// URL."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(f"{kind} data URLs must be base64-encoded (data:{kind}/...;base64,...).", param=where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"the {kind} data URL is not valid base64.", param=where) from None
    if url.startswith(("http://", "https://")):
        raise RequestError(f"remote {kind} URLs are not fetched; send the {kind} as a base64 data URL.", param=where)
    if not limits.allow_local_files:
        allow = f" unless the server is started with {limits.local_files_flag}" if limits.local_files_flag else ""
        raise RequestError(f"the {kind} must be a base64 data URL (data:{kind}/...;base64,...); local paths are not "
                           f"read{allow}.", param=where)
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise RequestError(f"{kind} file {path} does not exist.", param=where)
    return path


def _have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


@dataclass
class Media:
    """One request's images and videos, in the order of their parts, each header read and checked against the
    limits as its part comes (nothing decoded: run it off an event loop, it reads files and parses containers)."""

    limits: RequestLimits
    images: list[ImageInput] = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)

    def url_part(self, kind: str, url: str, where: str | None = None) -> dict:
        """An `image_url` / `video_url` part's URL -> the chat template's `{"type": "image"}` / `{"type": "video"}`."""
        if kind == "video_url":
            return self.video(read_url(url, "video", self.limits, where), where)
        return self.image(read_url(url, "image", self.limits, where), where)

    def image(self, source: bytes | Path, where: str | None = None) -> dict:
        """An encoded image (bytes or a path) -> `{"type": "image"}`, its header (size, EXIF orientation) kept."""
        label, most = f"image {len(self.images) + 1}", self.limits.max_image_pixels
        try:
            self.images.append(read_image_header(source, max_pixels=most, label=label))
        except ImageTooLarge as e:
            size = f"{e.width}x{e.height} pixels" if e.width else "too many pixels"
            raise RequestError(f"{label} is {size}; {self.limits.who} accepts at most {most} pixels per image.", 413,
                               "image_too_large", where) from None
        except EdgevlError as e:  # not an image, an unknown format, ...
            raise RequestError(str(e), param=where) from None
        return {"type": "image"}

    def video(self, source: bytes | Path, where: str | None = None) -> dict:
        """A video file (bytes or a path) -> `{"type": "video"}`, its header (frame size, count, rate) kept; its
        frames are decoded later, only those the token budget keeps."""
        limits = self.limits
        if not _have_pyav():   # a 400, not a 501: OpenAI clients retry 5xx, and a retry cannot help
            raise RequestError(f"{limits.who} cannot decode video because PyAV is not installed in its Python "
                               f"environment; install it with `pip install 'edgevl[video]'`.", code="video_unsupported")
        if isinstance(source, bytes) and len(source) > limits.max_video_bytes:
            raise RequestError(f"the video is {len(source)} bytes; {limits.who} accepts at most "
                               f"{limits.max_video_bytes} bytes per video.", 413, "video_too_large", where)
        try:
            self.videos.append(probe_video(source, max_frames=limits.max_video_frames,
                                           max_pixels=limits.max_image_pixels,
                                           label="the video" if isinstance(source, bytes) else None))
        except VideoTooLarge as e:
            raise RequestError(str(e), 413, "video_too_large", where) from None
        except EdgevlError as e:  # undecodable, no frames, ...
            raise RequestError(str(e), param=where) from None
        return {"type": "video"}


# ----------------------------------------------------------------------------- text, stop strings, sampling
def surrogate_problem(text: str) -> str | None:
    """What is wrong with `text` for the tokenizer, to follow its name: JSON can spell a lone UTF-16 surrogate
    ("\\ud800"), Python keeps it, and no tokenizer can encode it."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}), which is not a Unicode character, so "
            f"the tokenizer cannot encode it")


def stop_problem(strings: tuple[str, ...] | list[str]) -> str | None:
    """What is wrong with a request's stop strings, to follow the word `stop`."""
    if len(strings) > MAX_STOP_STRINGS:
        return f"has {len(strings)} strings; at most {MAX_STOP_STRINGS} are accepted"
    if any(not s for s in strings):
        return "must not contain an empty string"
    return None


def sampling_value_problem(name: str, value) -> str | None:
    """What is wrong with one sampling value, to follow its name: the runtime's rule and the value given."""
    problem = sampling_problem(name, value)
    return f"{problem}, got {show_value(value)}" if problem else None


def sampling_values(temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None) -> dict:
    """A request's sampling values (None = not given) -> the Pipeline's sampling keywords, each checked by the
    runtime's own rules: temperature 0 is greedy; temperature, top_p or top_k given turn sampling on (the others
    at OpenAI's defaults, top_k off: the model's generation_config, Qwen2-VL's top_k=1 and top_p=0.001, would
    make it greedy); nothing given keeps the model's generation_config.json."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        problem = None if value is None else sampling_value_problem(name, value)
        if problem:
            raise RequestError(f"{name} {problem}.", param=name)
    opts: dict = {"seed": seed, "repetition_penalty": repetition_penalty}
    if temperature == 0:
        opts["do_sample"] = False
    elif temperature is not None or top_p is not None or top_k is not None:
        opts.update(do_sample=True, temperature=1.0 if temperature is None else temperature,
                    top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k)
    return opts
