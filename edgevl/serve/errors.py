"""The server's errors: every failure becomes an OpenAI-style JSON body with a 4xx (or a 500 without details).

`ApiError` is a reply with a status and one sentence; `as_api_error` maps what the pipeline raises (EdgevlError,
ImageTooLarge, a failed allocation) to one; `RequestBodyLimit` holds the body size while the body is read.
"""

from __future__ import annotations

import json
import re

from edgevl.errors import EdgevlError
from edgevl.runtime.image_processing import ImageTooLarge


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers or {}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def clip(text: str, limit: int = 80) -> str:
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
