"""FastAPI app: `/v1/chat/completions` (plain and SSE streaming), `/v1/models`, `/health`, `/metrics`.

One scheduler owns the decoder (serve/scheduler/batching.py): with the in-place decoder of an `ort` export,
requests are batched continuously (each joins the running batch at the next decode step and leaves it
when done, at most `max_batch` rows, `max_queue` more waiting, a 429 beyond); for other decoders they
run one at a time in arrival order. The event loop only parses, validates and streams: a worker thread reads the
images' and videos' headers and checks the prompt's cost against the context (a 400 with the numbers before any
pixel is decoded), the scheduler's preparing thread decodes what that plan keeps, before a reply starts.
Every error is an OpenAI-style JSON body (`{"error": {"message", "type", "param", "code"}}`)
with a 4xx code, unknown routes and wrong methods included; nothing a client sends can take the
server down, and a streamed reply starts (200) only once the model has produced its first token,
so every problem with a request is a real 4xx, never an error inside a 200.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgevl.errors import EdgevlError
from edgevl.serve.scheduler.batching import make_scheduler
from edgevl.serve.scheduler.jobs import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    Job,
    QueueFull,
    RequestCancelled,
)
from edgevl.runtime.generate import Decoding
from edgevl.serve.body import parse_body, to_hf_messages, validation_api_error
from edgevl.serve.connections import DEFAULT_BODY_TIMEOUT_S
from edgevl.serve.errors import ApiError, RequestBodyLimit, as_api_error, clip, error_body, sentence
from edgevl.serve.metrics import ServerMetrics
from edgevl.serve.output import plan_reply
from edgevl.serve.replies import StreamReply, completion_body
from edgevl.serve.requests import RequestLimits, sampling_values

ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"
DISCONNECT_POLL_S = 0.25       # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerSettings:
    """`edgevl serve`'s flags: what one request may hold (`limits`, as in the Triton model), the body's size and
    time, and how requests are batched."""

    limits: RequestLimits = RequestLimits()
    max_request_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # the whole request body within this, else a 408 (RequestBodyLimit)
    max_batch: int = DEFAULT_MAX_BATCH             # requests decoded together (KV-cache rows), `--max-batch`
    max_queue: int = DEFAULT_MAX_QUEUE             # more requests accepted while the rows are busy; then 429
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK     # prompt tokens per prefill call while other rows decode
    prefix_cache: bool = False                     # finished rows keep their KV for prompts that share it


# ----------------------------------------------------------------------------- app
def create_app(pipe, model_name: str, settings: ServerSettings = ServerSettings()) -> FastAPI:
    metrics = ServerMetrics(settings.max_batch)
    scheduler = make_scheduler(pipe, settings.max_batch, settings.max_queue, settings.prefill_chunk, metrics,
                               settings.prefix_cache)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.close()

    app = FastAPI(title="edgevl", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    created = int(time.time())
    app.add_middleware(RequestBodyLimit, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s)
    limits = settings.limits

    def reply(exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.code, exc.param), exc.status, headers=exc.headers)

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
        where = f"{request.method} {clip(request.url.path)}"
        if exc.status_code == 404:
            message = f"there is no route {where}; this server has {ROUTES}."
        elif exc.status_code == 405:
            message = f"{where} is not allowed; this server has {ROUTES}."
        else:
            message = sentence(str(exc.detail)) if exc.detail else f"{where} failed with HTTP {exc.status_code}."
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
        request = parse_body(await raw.body())
        if request.model != model_name:
            raise ApiError(404, f"the model '{clip(request.model, 200)}' does not exist; this server serves "
                                f"'{model_name}'.", code="model_not_found", param="model")
        busy(scheduler.check_room)     # a full server says so before decoding any image
        # The values the pipeline will use (the request's over the model's generation_config.json), checked by the
        # same validation as the CLI and the Python API before any work starts, and then used as they are.
        sampling = pipe.sampling_options(**sampling_values(request.temperature, request.top_p, seed=request.seed))
        # logprobs, logit_bias, penalties, response_format, tools: refused by name unless this model can do them
        # (a JSON schema is compiled: off the event loop).
        reply = await run_in_threadpool(plan_reply, request, pipe)

        def plan():
            # Headers only (a container's frame count, an image's size), off the event loop: a prompt that cannot
            # fit is refused here, with its numbers, before a pixel is decoded.
            messages, media = to_hf_messages(request, limits)
            return pipe.plan_messages(messages, media.images, media.videos,
                                      **({"tools": reply.tools} if reply.tools else {}))

        planned = await run_in_threadpool(plan)
        max_tokens = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
        stop = request.stop_strings()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"

        def prepare():
            # On the scheduler's preparing thread (slow for a video: the event loop keeps streaming other replies).
            return pipe.prepare_plan(planned)

        job = Job(prepare, Decoding(sampling, max_tokens, stop, reply.output))
        tokenizer = pipe.tokenizer if reply.logprobs else None
        if not request.stream:
            submit(scheduler, job)
            try:
                result = await result_unless_gone(job, raw)
            except Exception as e:
                raise (as_api_error(e) or e) from None
            return completion_body(completion_id, model_name, result, reply, tokenizer)
        stream = Stream(asyncio.get_running_loop(), scheduler, job)
        first = await stream.first()   # video, preprocessing, vision and prefill are done: a 4xx still can be
        if first[0] == "error":
            raise (as_api_error(first[1]) or first[1]) from None
        return StreamingResponse(stream.events(first, StreamReply(completion_id, model_name, reply, tokenizer)),
                                 media_type="text/event-stream")

    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


RETRY_AFTER_S = 1     # a 429's Retry-After: a row frees up within a generation; clients back off from there


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
                       kind="requests", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
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


class Stream:
    """One streamed job: ("start", None) at its first token, ("logprobs", entries) and ("text", delta) events,
    then ("done", result) or ("error", e).

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
        job.on_logprobs = lambda entries: self._put("logprobs", entries)
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

    async def events(self, first, reply: StreamReply):
        """Server-sent events (replies.StreamReply): a role chunk, chunks as text arrives, a finish chunk, the
        usage chunk when asked, [DONE]."""
        try:
            for event in reply.start():
                yield event
            kind, value = first
            while True:
                if kind == "logprobs":
                    reply.logprobs(value)
                elif kind == "text":
                    for event in reply.text(value):
                        yield event
                elif kind == "done":
                    for event in reply.done(value):
                        yield event
                    break
                elif kind == "error":   # the 200 is already sent: an error can only be told in-band, as the server's fault
                    known = as_api_error(value)
                    message = known.message if known else f"internal error ({type(value).__name__})."
                    yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
                    break
                kind, value = await self.queue.get()
        finally:
            self.job.cancel()  # a client that hung up frees its row at the scheduler's next step
