"""Clients that go away or dawdle: no traceback in the server's log, and no connection held for ever.

A real `edgevl serve` in a subprocess with small timeouts (its stderr is the log users read), driven by raw
sockets: half a body then gone (Content-Length and chunked), headers never finished, a body never finished, an
idle kept-alive connection, a connection that sends nothing."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve_helpers import free_port

HEADER_S, BODY_S, KEEP_ALIVE_S = 1.0, 1.5, 1.0
SLACK_S = 3.0                   # a loaded 2-core machine: the deadline plus this, never the old "for ever"
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgevl", "serve", str(tiny_artifact), "--port", str(port),
                             "--model-name", "tiny", "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
                             "--keep-alive-timeout", str(KEEP_ALIVE_S)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    yield {"proc": proc, "url": url, "port": port}
    if proc.poll() is None:
        proc.terminate()
        proc.communicate(timeout=60)


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server["port"]), timeout=HEADER_S + BODY_S + SLACK_S + 5)


def _peer_closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    try:
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; (how long it took, what it sent)."""
    start, data = time.monotonic(), b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds} s (got {data[:200]!r})")
    except ConnectionResetError:
        pass
    return time.monotonic() - start, data


def _headers(length: int | None = None, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}"
            f"\r\n").encode()


def test_a_client_gone_with_half_its_body_sent_leaves_no_traceback(server):
    for message in (_headers(len(BODY)) + BODY[: len(BODY) // 2],                       # Content-Length
                    _headers(chunked=True) + f"{len(BODY):x}\r\n".encode() + BODY[:10],  # half a chunk
                    _headers(chunked=True) + b"5\r\n" + BODY[:5] + b"\r\n",             # whole chunks, no end
                    _headers(len(BODY))):                                               # headers only
        sock = _connect(server)
        sock.sendall(message)
        time.sleep(0.3)                     # the app is reading the body when the client goes
        sock.close()
    time.sleep(0.5)
    assert httpx.get(f"{server['url']}/health", timeout=10).status_code == 200


def test_unfinished_headers_are_cut_off(server):
    socks = [_connect(server) for _ in range(20)]
    for i, sock in enumerate(socks):
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GE")
    for sock in socks:
        took, data = _closed_within(sock, HEADER_S + SLACK_S)
        assert data == b""                  # closed, not answered: there is no request to answer
        sock.close()
    assert httpx.get(f"{server['url']}/health", timeout=10).status_code == 200


def test_a_connection_that_sends_nothing_is_closed(server):
    sock = _connect(server)
    took, data = _closed_within(sock, HEADER_S + SLACK_S)
    assert data == b"" and took >= HEADER_S * 0.8
    sock.close()


def test_headers_trickled_slower_than_the_deadline_are_cut_off(server):
    """Each byte arrives well within the deadline, the whole line never does."""
    sock, closed_after = _connect(server), None
    start = time.monotonic()
    for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" * 10:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - start
            break
        time.sleep(0.2)
        if _peer_closed(sock):
            closed_after = time.monotonic() - start
            break
    sock.close()
    assert closed_after is not None and HEADER_S * 0.8 <= closed_after < HEADER_S + SLACK_S, closed_after


def test_an_unfinished_body_gets_a_408(server):
    sock = _connect(server)
    sock.sendall(_headers(len(BODY)) + BODY[:20])
    took, data = _closed_within(sock, BODY_S + SLACK_S)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and f"within {BODY_S:g} seconds" in error["message"], error
    sock.close()


def test_an_idle_kept_alive_connection_is_closed_and_a_normal_one_is_served(server):
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    took, data = _closed_within(sock, KEEP_ALIVE_S + SLACK_S)
    assert data.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in data, data[:300]
    sock.close()
    # a next request's first bytes on a kept-alive connection get the header deadline again
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b'"ok"' not in data:
        data += sock.recv(65536)
    sock.sendall(b"GET /hea")
    took, rest = _closed_within(sock, HEADER_S + SLACK_S)
    assert rest == b"" and (data + rest).count(b"HTTP/1.1 200") == 1, data[:300]
    sock.close()
    r = httpx.post(f"{server['url']}/v1/chat/completions", content=BODY, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_the_log_has_no_traceback(server):
    """Last in this file: stop the server and read everything it logged (the fixture reads it at teardown)."""
    proc = server["proc"]
    proc.terminate()
    log = proc.communicate(timeout=60)[1]
    assert "Traceback" not in log and "ClientDisconnect" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_serve_help_names_the_timeouts_and_their_defaults():
    out = subprocess.run([sys.executable, "-m", "edgevl", "serve", "--help"], capture_output=True, text=True).stdout
    flat = " ".join(out.split())
    for flag, default in (("--header-timeout", 10), ("--body-timeout", 60), ("--keep-alive-timeout", 5)):
        assert flag in flat and f"(default: {default})" in flat, flag
