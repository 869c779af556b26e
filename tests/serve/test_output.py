"""`edgevl serve`'s response_format (serve/output.py; constrained decoding with llguidance): JSON-schema and JSON-object
replies, streamed and with logprobs; bad formats refused by name, and the missing extra named.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.openai_requests import MESSAGES, PERSON, is_person, ok, refused, stream_events
from tests.serve_helpers import one_sentence


openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1},
                                      {"temperature": 2.0, "seed": 7}, {"temperature": 1.2, "top_p": 0.9, "seed": 3}])
def test_json_schema_replies_parse_and_match_the_schema(base, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choice = ok(base, max_tokens=120, response_format=fmt, **sampling)["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert is_person(json.loads(choice["message"]["content"])), choice["message"]["content"]


def test_json_replies_stream_and_take_logprobs(base):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    events = stream_events(base, max_tokens=120, temperature=0.8, seed=11, response_format=fmt, logprobs=True)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert is_person(json.loads(text))
    entries = [x for e in events for x in (e["choices"][0]["logprobs"] or {}).get("content", [])]
    assert b"".join(bytes(x["bytes"]) for x in entries).decode() == text


def test_json_object_replies_are_json_objects(base):
    greedy = ok(base, max_tokens=120, temperature=0, response_format={"type": "json_object"})["choices"][0]
    assert isinstance(json.loads(greedy["message"]["content"]), dict)
    # Sampled, random weights write keys of random words: a reply cut by max_tokens is the start of an object.
    finished = 0
    for seed in range(4):
        choice = ok(base, max_tokens=60, temperature=1.0, seed=seed, response_format={"type": "json_object"})["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('{"')
    assert finished
    assert ok(base, max_tokens=3, temperature=0, response_format={"type": "text"})["choices"][0]["message"]["content"]


@pytest.mark.parametrize("fmt, field", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicated"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!"}}, "response_format.json_schema.name"),
    ({"type": "yaml"}, "response_format.type")])
def test_bad_response_formats_are_refused_by_name(base, fmt, field):
    refused(base, field, response_format=fmt)


def test_structured_output_without_llguidance_is_refused_naming_the_extra(pipeline, monkeypatch):
    from edgevl.runtime.constrained import GrammarCompiler
    from edgevl.serve.errors import ApiError
    from edgevl.serve.output import plan_reply
    from edgevl.serve.body import parse_body
    monkeypatch.setitem(sys.modules, "llguidance", None)          # `import llguidance` fails

    class Stub:
        template, config = pipeline.template, pipeline.config

        @property
        def grammars(self):
            return GrammarCompiler(pipeline.tokenizer.impl.to_str(), 2100, (0,))
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}):
        request = parse_body(json.dumps({"model": "tiny", "messages": MESSAGES, "response_format": fmt}).encode())
        with pytest.raises(ApiError) as e:
            plan_reply(request, Stub())
        assert e.value.param == "response_format" and "edgevl[serve]" in e.value.message
        assert one_sentence(e.value.message.replace("`pip install 'edgevl[serve]'`.", "it."))
    plain = parse_body(json.dumps({"model": "tiny", "messages": MESSAGES, "logprobs": True}).encode())
    assert plan_reply(plain, Stub()).output.grammar is None      # nothing else needs it
