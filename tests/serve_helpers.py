"""A real uvicorn server for an app, in a thread of the test process, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

SHAPE = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve `app` with uvicorn as `edgevl serve` configures it (edgevl.serve.connections); yields the base URL."""
    import uvicorn

    from edgevl.serve.connections import server_config
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="critical"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        scheduler = getattr(app.state, "scheduler", None)
        if scheduler is not None:
            scheduler.close()


def assert_error_shape(response, status: int | None = None) -> dict:
    """A non-2xx reply is the OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code >= 400, response.status_code
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == SHAPE, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message, body
    assert body["error"]["type"] in ("invalid_request_error", "server_error", "requests"), body   # requests: 429
    return body["error"]


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]
