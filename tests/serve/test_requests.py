"""serve/requests.py, the request parser `edgevl serve` and the Triton model share: the same bad request gets the
same sentence through the OpenAI server (HTTP, its error shape) and through the Triton model (its tensors,
INVALID_ARG), and the Triton side runs without the server's packages."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgevl.serve.errors import RequestError
from edgevl.serve.requests import RequestLimits, sampling_values
from edgevl.serve.triton import protocol
from edgevl.serve.triton.handler import EdgevlTritonModel
from tests.serve_helpers import assert_error_shape, one_sentence

LIMITS = RequestLimits(max_image_pixels=1000, max_video_bytes=64)


def png_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _Unreached:
    """A pipeline no request here reaches: each is refused while it is read."""

    generation_config: dict = {}
    video_settings = None

    def plan_messages(self, *args, **kwargs):
        raise AssertionError("the request should have been refused while it was read")

    def sampling_options(self, **sampling):
        from edgevl.runtime.sampling import SamplingOptions
        return SamplingOptions.from_generation_config(self.generation_config, **sampling)


@pytest.fixture(scope="module")
def server():
    from fastapi.testclient import TestClient

    from edgevl.serve.app import ServerSettings, create_app
    with TestClient(create_app(_Unreached(), "tiny", ServerSettings(LIMITS))) as client:
        yield client


def through_server(client, body: dict) -> dict:
    """The OpenAI error body's fields for a request the server refuses, with its HTTP status."""
    raw = json.dumps({"model": "tiny", **body})          # ensure_ascii: a lone surrogate travels as its escape
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    return {**assert_error_shape(r), "status": r.status_code}


def through_triton(messages: list, **tensors) -> tuple[RequestError, str]:
    """The error parse_request raises for the same request, and the sentence the model answers INVALID_ARG with."""
    arrays = {"messages": np.array([json.dumps(messages).encode()], dtype=object), **tensors}
    limits = dataclasses.replace(protocol.TRITON_LIMITS, max_image_pixels=LIMITS.max_image_pixels,
                                 max_video_bytes=LIMITS.max_video_bytes)
    with pytest.raises(RequestError) as e:
        protocol.parse_request(arrays, limits)
    code, sentence = EdgevlTritonModel.classify(e.value)
    assert code == "INVALID_ARG"
    return e.value, sentence


def url_part(kind: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": "What?"}]}]


@pytest.mark.parametrize("kind, url, status, code, words", [
    ("image_url", "data:image/png;base64,@@", 400, None, "the image data URL is not valid base64."),
    ("image_url", "data:image/png,raw", 400, None, "image data URLs must be base64-encoded"),
    ("image_url", "https://example.com/a.png", 400, None, "remote image URLs are not fetched"),
    ("image_url", "data:image/png;base64,AAAA", 400, None, "image 1 "),
    ("image_url", png_url(40, 30), 413, "image_too_large", "image 1 is 40x30 pixels; this server accepts at most 1000"),
    ("video_url", "data:video/mp4;base64," + base64.b64encode(bytes(100)).decode(), 413, "video_too_large",
     "the video is 100 bytes; this server accepts at most 64 bytes per video."),
    ("video_url", "https://example.com/a.mp4", 400, None, "remote video URLs are not fetched"),
])
def test_a_bad_image_or_video_gets_the_same_sentence_from_the_server_and_triton(server, kind, url, status, code,
                                                                               words):
    if kind == "video_url" and status == 413:
        pytest.importorskip("av")            # without PyAV both say so first
    messages = url_part(kind, url)
    error = through_server(server, {"messages": messages})
    assert (error["status"], error["code"], error["param"]) == (status, code, f"messages.0.content.0.{kind}.url")
    assert words in error["message"] and one_sentence(error["message"]), error
    refused, said = through_triton(messages)
    assert refused.message == error["message"].replace("this server", "this model")
    assert (refused.status, refused.code) == (status, code)
    assert said == f"messages[0].content[0].{kind}: {refused.message}"     # where, in Triton's words


def test_local_paths_are_refused_by_both_and_only_the_server_names_its_flag(server, tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    messages = url_part("image_url", str(path))
    error = through_server(server, {"messages": messages})
    refused, _ = through_triton(messages)
    assert refused.message == ("the image must be a base64 data URL (data:image/...;base64,...); local paths are not "
                               "read.")
    assert error["message"] == refused.message[:-1] + " unless the server is started with --allow-local-files."


@pytest.mark.parametrize("stop, words", [([""], "stop must not contain an empty string."),
                                         (["s"] * 17, "stop has 17 strings; at most 16 are accepted.")])
def test_stop_strings_follow_one_rule(server, stop, words):
    messages = [{"role": "user", "content": "hi"}]
    error = through_server(server, {"messages": messages, "stop": stop})
    assert error["message"] == words and error["param"] == "stop"
    refused, said = through_triton(messages, stop=np.array([s.encode() for s in stop], dtype=object))
    assert refused.message == said == words


def test_sampling_values_and_surrogates_get_the_same_sentence(server):
    messages = [{"role": "user", "content": "hi"}]
    error = through_server(server, {"messages": messages, "temperature": 2.5})
    refused, said = through_triton(messages, temperature=np.array([2.5], np.float32))
    assert error["message"] == refused.message == said and error["message"].startswith("temperature must be ")
    lone = [{"role": "user", "content": "a\ud800b"}]
    error = through_server(server, {"messages": lone})
    refused, _ = through_triton(lone)
    assert error["message"].removeprefix("messages.0.content ") == refused.message.removeprefix("messages[0].content ")
    assert "lone UTF-16 surrogate (U+D800)" in refused.message


def test_sampling_values_one_rule():
    """temperature 0 is greedy; temperature, top_p or top_k turn sampling on with OpenAI's defaults for the others
    (top_k off); nothing given keeps the model's generation_config."""
    assert sampling_values(temperature=0, seed=3) == {"seed": 3, "repetition_penalty": None, "do_sample": False}
    assert sampling_values(top_p=0.5) == {"seed": None, "repetition_penalty": None, "do_sample": True,
                                          "temperature": 1.0, "top_p": 0.5, "top_k": 0}
    assert sampling_values(top_k=5)["do_sample"] is True and sampling_values(top_k=5)["temperature"] == 1.0
    assert sampling_values(repetition_penalty=1.1) == {"seed": None, "repetition_penalty": 1.1}
    with pytest.raises(RequestError, match="top_k must be") as e:
        sampling_values(top_k=-1)
    assert e.value.param == "top_k" and one_sentence(e.value.message)


def test_the_triton_model_reads_requests_without_the_servers_packages():
    """A Triton model's Python has edgevl's own dependencies only: no pydantic, FastAPI or Starlette."""
    code = """
import sys
for name in ("pydantic", "fastapi", "starlette", "uvicorn"):
    sys.modules[name] = None               # importing any of them fails
import json
import numpy as np
from edgevl.serve.triton import handler, protocol, repository
request = protocol.parse_request({"messages": np.array([json.dumps([{"role": "user", "content": "hi"}]).encode()],
                                                       dtype=object), "temperature": np.array([0.0], np.float32)})
assert request.messages == [{"role": "user", "content": "hi"}] and request.sampling["do_sample"] is False
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
