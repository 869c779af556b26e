"""FastAPI app: `/v1/chat/completions` (plain and SSE streaming), `/v1/models`, `/health`, `/metrics`.

One scheduler owns the decoder (runtime/batching.py): with the in-place decoder of an `ort` export,
requests are batched continuously (each joins the running batch at the next decode step and leaves it
when done, at most `max_batch` rows, `max_queue` more waiting, a 429 beyond); for other decoders they
run one at a time in arrival order. The event loop only parses, validates and streams; videos are
decoded and images preprocessed on the scheduler's preparing thread, before a reply starts.
Every error is an OpenAI-style JSON body (`{"error": {"message", "type", "param", "code"}}`)
with a 4xx code, unknown routes and wrong methods included; nothing a client sends can take the
server down, and a streamed reply starts (200) only once the model has produced its first token,
so every problem with a request is a real 4xx, never an error inside a 200.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.util
import json
import re
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgevl.errors import EdgevlError
from edgevl.runtime.batching import make_scheduler
from edgevl.runtime.image_processing import ImageTooLarge, load_image
from edgevl.runtime.jobs import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    Job,
    QueueFull,
    RequestCancelled,
)
from edgevl.runtime.sampling import SamplingOptions
from edgevl.runtime.video import MAX_FRAMES, VideoClip, VideoTooLarge, load_video
from edgevl.serve.metrics import ServerMetrics
from edgevl.serve.schemas import ChatCompletionRequest, FieldProblem

DEFAULT_MAX_TOKENS = 256
ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"
DISCONNECT_POLL_S = 0.25       # how often a non-streaming request checks that its client is still there


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- request body limit
class RequestBodyLimit:
    """Pure ASGI middleware: at most `max_bytes` of request body, whatever the framing.

    A Content-Length over the limit is answered at once; otherwise the bytes of `http.request`
    messages are counted as the app reads them, so a chunked body (no Content-Length) is cut off as
    soon as it passes the limit: the 413 goes out, the app is told the client went away, and the
    connection closes instead of reading the rest. Nothing is buffered here.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send, size: str) -> None:
        body = json.dumps(error_body(f"the request body is {size} bytes; this server accepts at most "
                                     f"{self.max_bytes} bytes.", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._reject(send, value.decode())
        received, rejected, started = 0, False, False

        async def limited_receive():
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    if not started:
                        await self._reject(send, f"more than {self.max_bytes}")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if rejected:
                return          # the 413 is the reply; whatever the app says after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:    # after a 413 the app's ClientDisconnect (or what it made of it) is expected
                raise


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
    """A data URL (base64) or, when allowed, a local path / file:// URL -> an RGB PIL image, decoded by
    the runtime's `load_image` (EXIF orientation applied, as `edgevl run` and the Python API do), the
    pixel count checked before any pixel is decoded."""
    source = read_url(url, "image", limits)
    try:
        return load_image(source, max_pixels=limits.max_image_pixels, label="the image data")
    except ImageTooLarge as e:
        size = f"{e.width}x{e.height} pixels" if e.width else "too many pixels"
        raise ApiError(413, f"the image is {size}; this server accepts at most {limits.max_image_pixels} "
                            f"pixels per image.", code="image_too_large") from None
    except EdgevlError as e:  # not an image, truncated, an unsupported pixel mode, ...
        raise ApiError(400, str(e)) from None


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


# ----------------------------------------------------------------------------- errors
_ALLOC_SIZE = re.compile(r"buffer of size (\d+)")
_UNION_TAG = re.compile(r"[\[\]()]|^[A-Z]")


def out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: Python's MemoryError, or onnxruntime's Fail / RuntimeException
    ("Failed to allocate memory", std::bad_alloc), which is how a too-large image or prompt fails in
    today's vision and decoder graphs (their attention scores are [heads, N, N])."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__module__.startswith("onnxruntime"):
        text = str(exc)
        return "Failed to allocate memory" in text or "bad_alloc" in text
    return False


def as_api_error(exc: BaseException) -> ApiError | None:
    """The 4xx a failure of the pipeline stands for, or None for a bug (a 500 without details)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageTooLarge):
        return ApiError(413, str(exc), code="image_too_large")
    if isinstance(exc, EdgevlError):
        return ApiError(400, str(exc))
    if out_of_memory(exc):
        size = _ALLOC_SIZE.search(str(exc))
        need = f" (it needed {int(size.group(1)) / 1e9:.1f} GB at once)" if size else ""
        return ApiError(413, f"the image is too large for this server's memory{need}; send a smaller image, "
                             f"fewer video frames or a shorter prompt.", code="request_too_large")
    return None


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
    where = ".".join(loc) or "the request body"
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, FieldProblem):   # the shared validation's own words (sampling values, text)
        return ApiError(400, _sentence(f"{where} {error}"), param=where)
    return ApiError(400, _sentence(f"{_clip(where)}: {first.get('msg', 'invalid value')}"), param=where)


# ----------------------------------------------------------------------------- app
def create_app(pipe, model_name: str, limits: ServerLimits = ServerLimits()) -> FastAPI:
    metrics = ServerMetrics(limits.max_batch)
    scheduler = make_scheduler(pipe, limits.max_batch, limits.max_queue, limits.prefill_chunk, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.close()

    app = FastAPI(title="edgevl", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    created = int(time.time())
    app.add_middleware(RequestBodyLimit, max_bytes=limits.max_request_bytes)

    def reply(exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.code, exc.param), exc.status)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return reply(exc)

    @app.exception_handler(EdgevlError)
    async def edgevl_error(_, exc: EdgevlError):
        return reply(as_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return reply(validation_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)   # routing: 404, 405 (Starlette's {"detail": ...} otherwise)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where = f"{request.method} {_clip(request.url.path)}"
        if exc.status_code == 404:
            message = f"there is no route {where}; this server has {ROUTES}."
        elif exc.status_code == 405:
            message = f"{where} is not allowed; this server has {ROUTES}."
        else:
            message = _sentence(str(exc.detail)) if exc.detail else f"{where} failed with HTTP {exc.status_code}."
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        # A bug: the type only, never the text or a traceback (they can hold paths and data).
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}).", "server_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "edgevl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        request = parse_request(await raw.body())
        if request.model != model_name:
            raise ApiError(404, f"the model '{_clip(request.model, 200)}' does not exist; this server serves "
                                f"'{model_name}'.", code="model_not_found", param="model")
        busy(scheduler.check_room)     # a full server says so before decoding any image
        sampling = request.sampling()
        # The values the pipeline will use (the request's over the model's generation_config.json), checked
        # by the same validation as the CLI and the Python API, before any work starts.
        SamplingOptions.from_generation_config(pipe.generation_config, **sampling)
        messages, images, videos = to_hf_messages(request, limits)
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS
        stop = request.stop_strings()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"

        def prepare():
            # On the scheduler's preparing thread (slow for a video: the event loop keeps streaming other replies).
            clips = [decode_video(v, limits, pipe.video_settings) for v in videos]
            return pipe.prepare_messages(messages, images, clips)

        job = Job(prepare, max_tokens, stop, sampling)
        if not request.stream:
            submit(scheduler, job)
            try:
                result = await result_unless_gone(job, raw)
            except Exception as e:
                raise (as_api_error(e) or e) from None
            return completion_body(completion_id, model_name, result)
        stream = Stream(asyncio.get_running_loop(), scheduler, job)
        first = await stream.first()   # video, preprocessing, vision and prefill are done: a 4xx still can be
        if first[0] == "error":
            raise (as_api_error(first[1]) or first[1]) from None
        return StreamingResponse(stream.events(first, completion_id, model_name), media_type="text/event-stream")

    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


def submit(scheduler, job: Job) -> None:
    """Hand `job` to the scheduler; a full queue is a 429 in the OpenAI error shape, before any work."""
    busy(lambda: scheduler.submit(job))


def busy(call) -> None:
    """`call()`, with QueueFull as a 429 (OpenAI's rate-limit shape) and a closed scheduler as a 503."""
    try:
        call()
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e.running} running, {e.waiting} waiting: --max-batch "
                            f"{e.max_batch}, --max-queue {e.max_queue}); retry later.", code="rate_limit_exceeded",
                       kind="requests") from None
    except RequestCancelled:
        raise ApiError(503, "the server is shutting down.", kind="server_error") from None


async def result_unless_gone(job: Job, raw: Request):
    """The job's Result; if the client disconnects first, the job is cancelled (its row freed at the next step)."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if await raw.is_disconnected():
                job.cancel()
                return await future          # RequestCancelled, quickly: nobody reads the reply
    finally:
        if not future.done():
            job.cancel()


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


class Stream:
    """One streamed job: ("start", None) at its first token, ("text", delta) events, then ("done", result)
    or ("error", e).

    `first()` waits for the first event before the HTTP status is chosen: everything that can fail
    because of the request (decoding, preprocessing, the prompt's length, vision and prefill memory)
    has run by the first token, so it is a 4xx; only a failure while decoding later tokens is reported
    in-band. The reply (its role chunk) starts at the first token, so a client sees its time to first
    token even when the first tokens are no text yet (half a UTF-8 character, a special token).
    A client that goes away cancels the job: its row is freed at the scheduler's next step.
    """

    def __init__(self, loop, scheduler, job: Job):
        self.loop, self.queue, self.job = loop, asyncio.Queue(), job
        job.on_text = lambda delta: self._put("text", delta)
        job.on_start = lambda: self._put("start", None)
        job.future.add_done_callback(self._done)
        submit(scheduler, job)

    def _put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:    # the event loop is closed: the server is gone
            pass

    def _done(self, future) -> None:
        error = future.exception()
        if not isinstance(error, RequestCancelled):
            self._put("error", error) if error is not None else self._put("done", future.result())

    async def first(self) -> tuple[str, object]:
        try:
            return await self.queue.get()
        except asyncio.CancelledError:
            self.job.cancel()
            raise

    async def events(self, first, completion_id: str, model: str):
        """Server-sent events: a role chunk, content chunks as text arrives, a finish chunk, [DONE]."""
        try:
            yield _chunk(completion_id, model, {"role": "assistant", "content": ""})
            kind, value = first
            while True:
                if kind == "start":
                    pass
                elif kind == "text":
                    yield _chunk(completion_id, model, {"content": value})
                elif kind == "done":
                    reason = "length" if value.finish_reason == "length" else "stop"
                    yield _chunk(completion_id, model, {}, reason)
                    yield "data: [DONE]\n\n"
                    break
                else:   # the 200 is already sent: an error can only be told in-band, as the server's fault
                    known = as_api_error(value)
                    message = known.message if known else f"internal error ({type(value).__name__})."
                    yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
                    break
                kind, value = await self.queue.get()
        finally:
            self.job.cancel()  # a client that hung up frees its row at the scheduler's next step
