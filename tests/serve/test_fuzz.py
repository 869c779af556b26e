"""Property: whatever body a client sends to /v1/chat/completions, the server answers without a 5xx,
every non-2xx is the OpenAI error shape, and it stays healthy."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

from tests.serve_helpers import assert_error_shape, running

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _png_data_url() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Text with lone UTF-16 surrogates among ordinary characters (json.dumps sends them as \udXXX escapes).
text = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=24)
numbers = st.one_of(
    st.integers(), st.integers(min_value=-2**80, max_value=2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 2**63 - 1, 2**63, 2**64, 10**30, -10**30, 1e308, 5e-324, 0.5, 1.0, 2.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
small = st.integers(min_value=1, max_value=4)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                    max_leaves=8)
good_url = st.just(_png_data_url())
urls = st.one_of(good_url, st.sampled_from(["data:image/png;base64,!!!", "data:image/png;base64,AAAA",
                                            "data:image/png,raw", "https://example.com/a.png", "/etc/passwd",
                                            "file:///x.png", "data:video/mp4;base64,AAAA", ""]), text, junk)
roles = st.sampled_from(["system", "user", "assistant"])

# Well-formed requests with random values in range or not (these reach the model)...
plain = st.text(max_size=24)
good_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": plain}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": good_url})}))
good_message = st.fixed_dictionaries({"role": roles, "content": plain | st.lists(good_part, max_size=2)})
good_request = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.lists(good_message, min_size=1, max_size=3), "max_tokens": small},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
              "seed": st.integers(0, 2**63 - 1), "stop": plain | st.lists(plain, max_size=3),
              "stream": st.booleans(), "max_completion_tokens": small})

# ... the same with a few values anywhere in them replaced by junk ...
PLACES = [("model",), ("messages",), ("max_tokens",), ("max_completion_tokens",), ("temperature",), ("top_p",),
          ("seed",), ("stop",), ("stream",), ("n",), ("messages", 0), ("messages", 0, "role"),
          ("messages", 0, "content"), ("messages", 0, "content", 0), ("messages", 0, "content", 0, "type"),
          ("messages", 0, "content", 0, "text"), ("messages", 0, "content", 0, "image_url"),
          ("messages", 0, "content", 0, "image_url", "url")]


def _mutate(args) -> dict:
    request, changes = args
    for place, value in changes:
        target = request
        for key in place[:-1]:
            if isinstance(target, dict) and key in target or isinstance(target, list) and key < len(target):
                target = target[key]
            else:
                break
        else:
            if isinstance(target, dict) or isinstance(target, list) and place[-1] < len(target):
                target[place[-1]] = value
    return request


mutated = st.tuples(good_request, st.lists(st.tuples(st.sampled_from(PLACES), urls | junk | numbers),
                                            min_size=1, max_size=2)).map(_mutate)

# ... and anything at all.
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "video_url"]) | junk},
    optional={"text": text | junk, "image_url": st.fixed_dictionaries({"url": urls}) | junk,
              "video_url": st.fixed_dictionaries({"url": urls}) | junk})
message = st.fixed_dictionaries({"role": roles | junk, "content": text | st.lists(part, max_size=3) | junk})
request = st.fixed_dictionaries(
    {"model": st.just("tiny") | junk, "messages": st.lists(message, max_size=3) | junk},
    optional={"max_tokens": small | numbers | junk, "max_completion_tokens": small | numbers | junk,
              "temperature": numbers | junk, "top_p": numbers | junk, "seed": numbers | junk,
              "stop": text | st.lists(text | junk, max_size=20) | junk, "stream": st.booleans() | junk,
              "n": numbers | junk, "user": junk, "logprobs": junk})


def _encode(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()   # NaN / Infinity literals, as Python clients send them


def _corrupt(args) -> bytes:
    body, at, junk_bytes = args
    at = min(at, len(body))
    return body[:at] + junk_bytes + body[at:]


bodies = st.one_of(
    good_request.map(_encode),                                   # valid structure, random values
    mutated.map(_encode),                                        # the same with junk in one or two places
    mutated.map(_encode),
    request.map(_encode),                                        # random fields and values
    junk.map(_encode),                                           # any JSON value
    st.binary(max_size=64),                                      # any bytes, invalid UTF-8 included
    st.tuples(good_request.map(_encode), st.integers(0, 400), st.binary(min_size=1, max_size=3)).map(_corrupt),
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_artifact):
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.serve.app import ServerSettings, create_app
    from edgevl.serve.requests import RequestLimits
    # A 256-token context bounds every generation (a valid max_tokens of 10**30 included).
    pipe = Pipeline.load(tiny_artifact, options=BackendOptions(max_context=256))
    settings = ServerSettings(RequestLimits(max_image_pixels=100_000), max_request_bytes=256 * 1024)
    with running(create_app(pipe, "tiny", settings)) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies)
def test_random_bodies_never_get_a_5xx(fuzz_server, body):
    r = fuzz_server.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 300:
        assert_error_shape(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), r.text[-500:]
    else:
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_the_server_is_healthy_after_the_fuzzing(fuzz_server):
    assert fuzz_server.get("/health").json()["status"] == "ok"
    r = fuzz_server.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "temperature": 0,
                                                       "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200
