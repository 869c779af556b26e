"""Serving errors: every failure becomes an OpenAI-style JSON body with a 4xx (or a 500 without details) in the
server, and a TritonError with the same sentence in the Triton model.

`RequestError` is what the request parser (requests.py) raises for a bad request, for both: one sentence, the HTTP
status and OpenAI code the server answers with, and where in the request (`param`); the Triton model answers
INVALID_ARG with the sentence. `ApiError` is one of the server's own replies (a status, one sentence, and the
reply's type and headers); `as_api_error` maps what the parser and the pipeline raise (RequestError, EdgevlError,
ImageTooLarge, a failed allocation) to one; `RequestBodyLimit` holds the body's size and time while it is read.
Nothing here imports FastAPI or Starlette: the Triton model imports this module too.
"""

from __future__ import annotations

import asyncio
import json
import re

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import PromptTooLong
from edgevl.runtime.inputs.image_loading import ImageTooLarge
from edgevl.runtime.inputs.video import VideoTooLarge


class RequestError(EdgevlError):
    """The client's request is wrong: `message` is one sentence for the client; `status` the HTTP status and `code`
    the OpenAI error code the server answers with (400, or 413 for a too-large image or video); `param` where in
    the request (the server's OpenAI `param`; the Triton model puts it before a sentence that does not name it)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


class ApiError(RequestError):
    """One of the server's replies: a RequestError with the OpenAI error `type` (`kind`) and HTTP headers."""

    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message, status, code, param)
        self.kind, self.headers = kind, headers or {}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- request body limit
DISCONNECT = {"type": "http.disconnect"}


class RequestBodyLimit:
    """Pure ASGI middleware: at most `max_bytes` of request body, all of it within `timeout_s` seconds of the
    request's start, whatever the framing.

    A Content-Length over the limit is answered at once; otherwise the bytes of `http.request`
    messages are counted as the app reads them, so a chunked body (no Content-Length) is cut off as
    soon as it passes the limit: the 413 goes out, the app is told the client went away, and the
    connection closes instead of reading the rest. A body still incomplete at the deadline gets a 408 the
    same way, so a slow client cannot hold a connection and a request for ever. A client that goes away with
    its body half sent has nobody to answer: what the app raises about it (Starlette's ClientDisconnect) ends
    the request quietly, without a traceback in the server's log. Nothing is buffered here.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def too_large(self, size: str) -> str:
        return f"the request body is {size} bytes; this server accepts at most {self.max_bytes} bytes."

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await _refuse(send, 413, self.too_large(value.decode()), "request_too_large")
        body = _Body(self, receive, send)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.ended:  # after a 413 / 408, or a client gone mid-body, the app's ClientDisconnect is expected
                raise


class _Body:
    """One request's body as the app reads it: counted, timed, and ended early (a 413, a 408, the client gone)."""

    def __init__(self, limit: RequestBodyLimit, receive, send):
        self.limit, self._receive, self._send = limit, receive, send
        self.received, self.started, self.complete, self.ended = 0, False, False, False
        self.loop = asyncio.get_running_loop()
        self.deadline = None if limit.timeout_s is None else self.loop.time() + limit.timeout_s

    async def receive(self) -> dict:
        if self.ended:
            return DISCONNECT
        if self.complete:                   # after the body the app only listens for a disconnect: not timed
            return await self._receive()
        left = None if self.deadline is None else max(self.deadline - self.loop.time(), 0.0)
        try:
            message = await asyncio.wait_for(self._receive(), left)
        except TimeoutError:
            return await self._end(408, f"the request body did not arrive within {self.limit.timeout_s:g} seconds; "
                                        f"send it faster or in fewer requests.", "request_timeout")
        if message["type"] == "http.disconnect":
            self.ended = True               # gone with its body half sent: nobody to answer
        elif message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_bytes:
                return await self._end(413, self.limit.too_large(f"more than {self.limit.max_bytes}"),
                                       "request_too_large")
            self.complete = not message.get("more_body", False)
        return message

    async def send(self, message: dict) -> None:
        if self.ended:
            return              # the 413 / 408 is the reply (or nobody listens); what the app says after it is dropped
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _end(self, status: int, message: str, code: str) -> dict:
        self.ended = True
        if not self.started:
            await _refuse(self._send, status, message, code)
        return DISCONNECT


async def _refuse(send, status: int, message: str, code: str) -> None:
    """A whole error reply that closes the connection (the rest of the body is never read)."""
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_ALLOC_SIZE = re.compile(r"buffer of size (\d+)")


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
    if isinstance(exc, RequestError):
        return ApiError(exc.status, exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, ImageTooLarge):
        return ApiError(413, str(exc), code="image_too_large")
    if isinstance(exc, PromptTooLong):     # OpenAI's code for a prompt over the context
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, VideoTooLarge):
        return ApiError(413, str(exc), code="video_too_large")
    if isinstance(exc, EdgevlError):
        return ApiError(400, str(exc))
    if out_of_memory(exc):
        size = _ALLOC_SIZE.search(str(exc))
        need = f" (it needed {int(size.group(1)) / 1e9:.1f} GB at once)" if size else ""
        return ApiError(413, f"the request is too large for this server's memory{need}; send smaller images, "
                             f"fewer video frames or a shorter prompt.", code="request_too_large")
    return None
