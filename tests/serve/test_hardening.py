"""The server against hostile input: the body limit holds whatever the framing, every error is the OpenAI
error shape with one sentence, out-of-range values are 400s decided before a streamed reply starts, a
photo too large for memory is a 413, and the server stays healthy."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import threading
import time

import httpx
import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.sampling import SamplingOptions, validate_sampling
from tests.serve_helpers import assert_error_shape, one_sentence, running

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

LIMIT = 1024 * 1024
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def small_pipeline(tiny_artifact):
    """The tiny model with a 256-token context: a long prompt is refused without a long generation."""
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(tiny_artifact, options=BackendOptions(max_context=256))


@pytest.fixture(scope="module")
def live(small_pipeline):
    from edgevl.serve.app import ServerSettings, create_app
    from edgevl.serve.requests import RequestLimits
    app = create_app(small_pipeline, "tiny", ServerSettings(RequestLimits(max_image_pixels=1_000_000),
                                                            max_request_bytes=LIMIT))
    with running(app) as base:
        yield base


def post(base, body, **kwargs):
    if not isinstance(body, (bytes, str)) and not callable(getattr(body, "__next__", None)):
        body = json.dumps(body)
    return httpx.post(f"{base}/v1/chat/completions", content=body, timeout=60,
                      headers={"content-type": "application/json"}, **kwargs)


def healthy(base) -> bool:
    return httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"


def _shared_message(**value) -> str:
    with pytest.raises(EdgevlError) as e:
        validate_sampling(**value)
    return str(e.value)


# ----------------------------------------------------------------------------- body limit
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory through /proc")
def test_chunked_body_is_cut_off_at_the_limit_not_read_whole(live):
    """A 64 MiB `Transfer-Encoding: chunked` POST (no Content-Length) gets its 413 once the first MiB is
    read; the server (in this process) never holds the body, and the connection closes."""
    port = int(live.rsplit(":", 1)[1])
    peak, baseline, done = [0], _rss_bytes(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    total, sent, reply = 64 * 1024 * 1024, 0, b""
    chunk = os.urandom(64 * 1024)
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    start = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:   # until the server answers
                s.sendall(frame)
                sent += len(chunk)
        except OSError:   # the server closed the connection after its 413: the rest is never read
            pass
        try:
            while (data := s.recv(65536)):
                reply += data
        except OSError:
            pass
    elapsed = time.time() - start
    done.set()
    sampler.join()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"] and one_sentence(error["message"])
    assert elapsed < 10 and sent < total // 2, (elapsed, sent)
    assert peak[0] - baseline < 24 * 1024 * 1024, (peak[0] - baseline) / 2**20   # the body is 64 MiB
    assert healthy(live)


def test_chunked_body_from_a_client_library_gets_the_413(live):
    def chunks():
        for _ in range(64):
            yield b"x" * 65536       # 4 MiB in all, never announced in a Content-Length
    r = post(live, chunks())
    assert_error_shape(r, 413)
    r = post(live, b"x" * (2 * LIMIT))      # the Content-Length fast path
    assert "2097152 bytes" in assert_error_shape(r, 413)["message"]
    assert healthy(live)


def test_a_body_under_the_limit_in_chunks_is_served(live):
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "temperature": 0}).encode()
    r = post(live, iter([body[:10], body[10:]]))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


# ----------------------------------------------------------------------------- error shape
def test_invalid_utf8_routes_and_methods_are_openai_errors(live):
    message = assert_error_shape(post(live, b'{"model": "tiny", "messages": "\xff\xfe"}'), 400)["message"]
    assert "UTF-8" in message and one_sentence(message)
    message = assert_error_shape(httpx.get(f"{live}/v1/nothing-here"), 404)["message"]
    assert "/v1/nothing-here" in message and "POST /v1/chat/completions" in message
    r = httpx.get(f"{live}/v1/chat/completions")
    assert "GET /v1/chat/completions" in assert_error_shape(r, 405)["message"] and r.headers["allow"] == "POST"
    assert_error_shape(httpx.delete(f"{live}/health"), 405)
    assert healthy(live)


@pytest.mark.parametrize("body, words", [
    (b"[1, 2]", "JSON object, got a JSON array"), (b'"hello"', "got a JSON string"), (b"3", "got a JSON number"),
    (b"null", "got a JSON null"), (b"", "not valid JSON"), (b'{"model": "tiny",', "not valid JSON"),
    (b"[" * 100_000, "nested too deeply"), (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"model": "tiny"}', "messages: Field required"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}, 5]}]}).encode(),
     "messages.0.content.1:"),
    (json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages.0.role:"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "n": 2}).encode(), "n:"),
    (json.dumps({"model": "tiny", "messages": MESSAGES, "stop": ["s"] * 17}).encode(), "stop has 17 strings"),
])
def test_bad_bodies_are_400s_with_one_sentence(live, body, words):
    error = assert_error_shape(post(live, body), 400)
    assert words in error["message"] and one_sentence(error["message"]), error


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", "7"), ("temperature", -0.5), ("temperature", 2.5),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"), ("temperature", True),
    ("top_p", 0), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", [0.5]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_sampling_values_are_400s_in_the_runtime_s_words(live, field, value, stream):
    """Refused before a reply starts (also with stream: true), with exactly the sentence the CLI and the
    Python API give for the same value."""
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "stream": stream, field: value})   # NaN, Infinity
    error = assert_error_shape(post(live, body), 400)
    assert error["message"] == _shared_message(**{field: value}) and error["param"] == field


@pytest.mark.parametrize("where", ["content", "text part", "model", "stop"])
def test_lone_surrogates_are_400s(live, where):
    lone = "a\ud800b"
    body = {"model": "tiny", "messages": [{"role": "user", "content": lone}]}
    if where == "text part":
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": lone}]}]
    elif where == "model":
        body = {"model": lone, "messages": MESSAGES}
    elif where == "stop":
        body = {"model": "tiny", "messages": MESSAGES, "stop": [lone]}
    raw = json.dumps(body)               # ensure_ascii: the surrogate travels as the escape \ud800
    assert "\\ud800" in raw
    error = assert_error_shape(post(live, raw), 400)
    assert "lone UTF-16 surrogate (U+D800)" in error["message"] and "tokenizer" in error["message"]
    assert one_sentence(error["message"])
    assert healthy(live)


def test_huge_max_tokens_is_bounded_by_the_context(live):
    r = post(live, {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**30, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 256


def test_a_too_long_prompt_is_a_400_also_when_streaming(live):
    """The status is chosen once the model has produced its first text: a prompt over the context is a
    real 400, not a 200 with an error event."""
    for stream in (False, True):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}], "stream": stream}
        error = assert_error_shape(post(live, body), 400)
        assert "context" in error["message"]


def test_streaming_still_streams(live):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"role": "assistant"' in events[0]
    assert not any('"error"' in e for e in events)


def test_exif_rotated_jpeg_through_the_server_equals_the_path_through_the_pipeline(live, small_pipeline, tmp_path):
    import skimage.data
    from PIL import Image
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(skimage.data.chelsea()).resize((226, 150)).save(path, exif=exif, quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}
    r = post(live, body)
    assert r.status_code == 200, r.text
    expected = small_pipeline.generate("What is this?", images=[path], max_new_tokens=8, do_sample=False)
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_image_over_the_pixel_limit_is_a_413_before_decoding(live, tmp_path):
    from PIL import Image
    path = tmp_path / "wide.png"
    Image.new("RGB", (1001, 1000)).save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [part]}]}
    error = assert_error_shape(post(live, body), 413)
    assert "1001x1000 pixels" in error["message"] and error["code"] == "image_too_large"


# ----------------------------------------------------------------------------- failures inside the pipeline
class FakePipe:
    """The server's view of a Pipeline whose generation fails with `error` (after `texts` deltas)."""

    generation_config: dict = {}
    video_settings = None

    def __init__(self, error: BaseException, texts=()):
        self.error, self.texts = error, texts

    def plan_messages(self, messages, images, videos):
        return object()

    def sampling_options(self, **sampling):
        return SamplingOptions.from_generation_config(self.generation_config, **sampling)

    def prepare_plan(self, plan):
        return object()

    def generate_prepared(self, rows, decoding, on_text=None, on_logprobs=None, preprocess_s=0.0):
        for text in self.texts:
            if on_text:
                on_text(0, text)
        raise self.error


def _client(pipe):
    from fastapi.testclient import TestClient

    from edgevl.serve.app import create_app
    return TestClient(create_app(pipe, "tiny"), raise_server_exceptions=False)


def _ort_allocation_failure():
    """What onnxruntime raises when today's vision graph meets a 12 MP photo (its [heads, N, N] scores)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail
    return Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running FusedMatMul node. "
                "Status Message: bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, "
                "onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 61917364224")


@pytest.mark.parametrize("error", [_ort_allocation_failure, MemoryError])
@pytest.mark.parametrize("stream", [False, True])
def test_a_photo_too_large_for_memory_is_a_413(error, stream):
    client = _client(FakePipe(error()))
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "stream": stream})
    message = assert_error_shape(r, 413)["message"]
    assert message.startswith("the request is too large for this server's memory") and one_sentence(message)
    if error is not MemoryError:
        assert "61.9 GB" in message
    assert client.get("/health").status_code == 200


def test_pipeline_errors_are_400s_with_their_sentence():
    client = _client(FakePipe(EdgevlError("the prompt is 9 tokens long but the model's context is 4 tokens.")))
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "stream": stream})
        assert assert_error_shape(r, 400)["message"].startswith("the prompt is 9 tokens long")


def test_a_bug_is_a_500_without_its_text_or_a_traceback():
    client = _client(FakePipe(RuntimeError("secret /home/someone/model.onnx")))
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    error = assert_error_shape(r, 500)
    assert error == {"message": "internal error (RuntimeError).", "type": "server_error", "param": None, "code": None}
    assert "secret" not in r.text and "Traceback" not in r.text


def test_a_failure_after_the_stream_started_is_in_band_and_the_server_s_fault():
    client = _client(FakePipe(EdgevlError("decoding failed."), texts=["Hello"]))
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "stream": True})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[1]["choices"][0]["delta"]["content"] == "Hello"
    assert events[-1] == {"error": {"message": "decoding failed.", "type": "server_error", "param": None,
                                    "code": None}}
