"""serve/triton/protocol.py: a request's tensors and messages JSON read into values, refused with one sentence where
bad, streaming only where the model is decoupled, and the image pixel limit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edgevl.serve.triton import protocol
from edgevl.serve.triton.protocol import RequestError, parse_messages, parse_request
from tests.serve.triton import data_url, image_message


def _tensors(messages, **values):
    out = {"messages": np.array([json.dumps(messages).encode()], dtype=object)}
    for name, value in values.items():
        out[name] = value if isinstance(value, np.ndarray) else np.array(value)
    return out


def test_parse_request_values(photos):
    png = Path(photos["coffee"]).read_bytes()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image_url", "image_url": {"url": data_url(
                photos["astronaut"])}}, {"type": "text", "text": "Compare."}]}]
    req = parse_request(_tensors(msgs, images=np.array([png], dtype=object), max_tokens=np.array([5], np.int32),
                                 temperature=np.array([0.5], np.float32), stop=np.array([b"\n", b"END"], dtype=object),
                                 stream=np.array([False])))
    assert req.messages[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    assert [im.size for im in req.images] == [(600, 400), (512, 512)]
    assert req.max_tokens == 5 and req.stop == ("\n", "END") and req.stream is False
    assert req.sampling["do_sample"] is True and req.sampling["temperature"] == pytest.approx(0.5)
    assert req.sampling["top_k"] == 0 and req.sampling["top_p"] == 1.0
    assert parse_request(_tensors(msgs[:1], temperature=np.array([0.0], np.float32))).sampling["do_sample"] is False
    assert "do_sample" not in parse_request(_tensors(msgs[:1])).sampling     # the model's generation_config
    whole_body = {"model": "x", "messages": msgs[:1]}                       # a chat-completions body works too
    assert parse_request(_tensors(whole_body)).messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("messages, values, fragment", [
    ("not json", {}, "messages is not valid JSON"),
    ([], {}, "non-empty JSON array"),
    ([{"role": "robot", "content": "hi"}], {}, "messages[0].role must be one of"),
    ([{"role": "user", "content": 3}], {}, "messages[0].content must be a string or an array"),
    ([{"role": "user", "content": [{"type": "audio"}]}], {}, "messages[0].content[0] must be a content part"),
    ([{"role": "user", "content": [{"type": "image"}]}], {}, "no image left"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}], {},
     "remote image URLs are not fetched"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}], {},
     "local paths are not read"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}], {},
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], {},
     "image 1"),
    ([{"role": "user", "content": "\ud800"}], {}, "lone UTF-16 surrogate"),
    ([{"role": "user", "content": "hi"}], {"images": np.array([b"x"], dtype=object)}, "more image(s)"),
    ([{"role": "user", "content": "hi"}], {"temperature": np.array([3.0], np.float32)}, "temperature must be"),
    ([{"role": "user", "content": "hi"}], {"top_p": np.array([0.0], np.float32)}, "top_p must be"),
    ([{"role": "user", "content": "hi"}], {"seed": np.array([-1], np.int64)}, "seed must be"),
    ([{"role": "user", "content": "hi"}], {"max_tokens": np.array([0], np.int32)}, "max_tokens must be at least 1"),
    ([{"role": "user", "content": "hi"}], {"max_tokens": np.array([1, 2], np.int32)}, "must hold one value"),
    ([{"role": "user", "content": "hi"}], {"top_k": np.array([1.5], np.float32)}, "top_k must be an integer"),
    ([{"role": "user", "content": "hi"}], {"stop": np.array([b"s"] * 17, dtype=object)}, "at most 16"),
    ([{"role": "user", "content": "hi"}], {"stop": np.array([b"\xff"], dtype=object)}, "not valid UTF-8"),
])
def test_parse_request_refuses_with_one_sentence(messages, values, fragment):
    tensors = _tensors(messages, **values)
    if messages == "not json":
        tensors["messages"] = np.array([b"not json"], dtype=object)
    with pytest.raises(RequestError) as e:
        parse_request(tensors)
    assert fragment in str(e.value)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_parse_request_stream_only_when_decoupled():
    with pytest.raises(RequestError, match="not decoupled"):
        parse_request(_tensors([{"role": "user", "content": "hi"}], stream=np.array([True])), decoupled=False)
    with pytest.raises(RequestError, match="no messages input"):
        parse_request({})


def test_image_pixel_limit(photos):
    limits = dataclasses.replace(protocol.TRITON_LIMITS, max_image_pixels=1000)
    with pytest.raises(RequestError, match="512x512 pixels; this model accepts at most 1000"):
        parse_messages(json.dumps(image_message("x", data_url(photos["astronaut"]))), limits=limits)
