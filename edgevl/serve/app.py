"""FastAPI app: `/v1/chat/completions` (plain and SSE streaming), `/v1/models`, `/health`.

One worker thread runs generations in arrival order (a FIFO queue: fair, and the
Pipeline is never used by two threads at once); the event loop only parses,
validates and streams. Videos are decoded on the worker too, before a reply starts.
Every error is an OpenAI-style JSON body with a 4xx code; nothing a client sends
can take the server down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.util
import io
import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.runtime.video import MAX_FRAMES, VideoClip, VideoTooLarge, load_video
from edgevl.serve.schemas import ChatCompletionRequest

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096            # per image, and per video frame
    allow_local_files: bool = False
    # Decoded bytes of one video data URL: 24 MiB is the most a default 32 MiB request holds in base64.
    max_video_bytes: int = 24 * 1024 * 1024
    max_video_frames: int = MAX_FRAMES             # frames sampled per video (at 2 fps), as `--max-frames`


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class Cancelled(Exception):
    """Raised inside a generation callback when the streaming client went away."""


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ----------------------------------------------------------------------------- messages
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


def decode_image(url: str, limits: ServerLimits) -> Image.Image:
    """A data URL (base64) or, when allowed, a local path / file:// URL -> a decoded PIL image."""
    source = read_url(url, "image", limits)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if image.width * image.height > limits.max_image_pixels:
            raise ApiError(413, f"the image is {image.width}x{image.height} pixels; this server accepts at most "
                                f"{limits.max_image_pixels} pixels per image.", code="image_too_large")
        image.load()
    except ApiError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        raise ApiError(400, f"an image could not be decoded ({type(e).__name__}).") from None
    return image


def _have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def video_source(url: str, limits: ServerLimits) -> bytes | Path:
    """Check a video URL (cheap, on the event loop); `decode_video` decodes it later in the worker."""
    if not _have_pyav():   # 400, not 501: OpenAI clients retry 5xx, and a retry cannot help
        raise ApiError(400, "this server cannot decode video because PyAV is not installed; install it with "
                            "`pip install 'edgevl[video]'`.", code="video_unsupported")
    source = read_url(url, "video", limits)
    if isinstance(source, bytes) and len(source) > limits.max_video_bytes:
        raise ApiError(413, f"the video is {len(source)} bytes; this server accepts at most "
                            f"{limits.max_video_bytes} bytes per video.", code="video_too_large")
    return source


def decode_video(source: bytes | Path, limits: ServerLimits, settings) -> VideoClip:
    """Video bytes or a local path -> sampled frames at the model's size (`settings`: the pipeline's video
    processor settings). PyAV decodes from a file, so bytes go to a temp one."""
    with tempfile.TemporaryDirectory(prefix="edgevl-video-") as tmp:
        path, label = source, None
        if isinstance(source, bytes):
            # The temp file's name means nothing to the client: errors say "the video".
            path, label = Path(tmp) / "video", "the video"
            path.write_bytes(source)
        try:
            return load_video(path, max_frames=limits.max_video_frames, temporal_patch_size=settings.temporal_patch_size,
                              max_pixels=limits.max_image_pixels, label=label, settings=settings)
        except VideoTooLarge as e:
            raise ApiError(413, str(e), code="video_too_large") from None
        except EdgevlError as e:  # undecodable, too few frames, ...
            raise ApiError(400, str(e)) from None


def to_hf_messages(request: ChatCompletionRequest,
                   limits: ServerLimits) -> tuple[list[dict], list[Image.Image], list[bytes | Path]]:
    """OpenAI messages -> the chat template's content-list format, the images and the (undecoded) videos."""
    messages, images, videos = [], [], []
    for m in request.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        content = []
        for part in m.content:
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
            elif part.type == "image_url":
                if part.image_url is None:
                    raise ApiError(400, "an image_url content part has no image_url.")
                images.append(decode_image(part.image_url.url, limits))
                content.append({"type": "image"})
            else:
                if part.video_url is None:
                    raise ApiError(400, "a video_url content part has no video_url.")
                videos.append(video_source(part.video_url.url, limits))
                content.append({"type": "video"})
        messages.append({"role": m.role, "content": content})
    return messages, images, videos


# ----------------------------------------------------------------------------- app
def create_app(pipe, model_name: str, limits: ServerLimits = ServerLimits()) -> FastAPI:
    app = FastAPI(title="edgevl", version="1", docs_url=None, redoc_url=None)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevl-generate")  # FIFO: fair order
    created = int(time.time())

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
            return JSONResponse(error_body(f"the request is {length} bytes; the limit is "
                                           f"{limits.max_request_bytes} bytes.", code="request_too_large"), 413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.code), exc.status)

    @app.exception_handler(EdgevlError)
    async def edgevl_error(_, exc: EdgevlError):
        return JSONResponse(error_body(str(exc)), 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON."), 400)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return JSONResponse(error_body(f"{where}: {first.get('msg')}"), 400)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}).", "server_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "edgevl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        if request.model != model_name:
            raise ApiError(404, f"the model '{request.model}' does not exist; this server serves "
                                f"'{model_name}'.", code="model_not_found")
        messages, images, videos = to_hf_messages(request, limits)
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        # Videos are decoded in the worker (slow: the event loop keeps streaming other replies), but
        # before the response starts, so a bad video is a 4xx even with stream: true.
        clips = [await loop.run_in_executor(worker, decode_video, v, limits, pipe.video_settings) for v in videos]

        def run(on_text=None):
            row = pipe.prepare_messages(messages, images, clips)
            return pipe.generate_prepared([row], max_tokens, request.stop_strings(), on_text,
                                          **request.sampling())[0]

        if not request.stream:
            result = await loop.run_in_executor(worker, run)
            return completion_body(completion_id, model_name, result)
        return StreamingResponse(stream_events(loop, worker, run, completion_id, model_name),
                                 media_type="text/event-stream")

    app.state.worker = worker
    return app


def completion_body(completion_id: str, model: str, result) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": "length" if result.finish_reason == "length" else "stop"}],
        "usage": {"prompt_tokens": len(result.prompt_token_ids), "completion_tokens": len(result.token_ids),
                  "total_tokens": len(result.prompt_token_ids) + len(result.token_ids)},
    }


def _chunk(completion_id: str, model: str, delta: dict, finish_reason: str | None = None) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"


async def stream_events(loop, worker, run, completion_id: str, model: str):
    """Server-sent events: a role chunk, content chunks as text arrives, a finish chunk, [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = False

    def on_text(_row, delta: str) -> None:
        if cancelled:
            raise Cancelled
        loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

    def job():
        try:
            result = run(on_text)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except Cancelled:
            pass
        except Exception as e:  # report in-band: the HTTP status is already sent
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    future = loop.run_in_executor(worker, job)
    try:
        yield _chunk(completion_id, model, {"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield _chunk(completion_id, model, {"content": value})
            elif kind == "done":
                reason = "length" if value.finish_reason == "length" else "stop"
                yield _chunk(completion_id, model, {}, reason)
                yield "data: [DONE]\n\n"
                break
            else:
                message = str(value) if isinstance(value, EdgevlError) else f"internal error ({type(value).__name__})"
                yield f"data: {json.dumps(error_body(message))}\n\n"
                break
    finally:
        cancelled = True  # a client that hung up stops the generation at its next token
        await future
