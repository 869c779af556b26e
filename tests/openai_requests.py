"""Requests to `edgevl serve` for the OpenAI-field tests: post a body, take the 200, expect a 400 naming a field."""

from __future__ import annotations

import json

import httpx

from tests.serve_helpers import assert_error_shape, one_sentence

MESSAGES = [{"role": "user", "content": "Tell me a story about the sea."}]
# A schema whose every value is bounded, so that random weights finish it within a few dozen tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}


def is_person(value) -> bool:
    """Whether a reply's JSON value is one PERSON allows."""
    p = PERSON["properties"]
    return (isinstance(value, dict) and set(PERSON["required"]) <= set(value) <= set(p)
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and type(value["age"]) is int and 0 <= value["age"] <= 120 and isinstance(value["ok"], bool)
            and (isinstance(value.get("tags", []), list) and len(value.get("tags", [])) <= 3
                 and all(t in ("a", "b", "c") for t in value.get("tags", []))))


def server_for(pipe):
    """A real uvicorn server for `pipe` (context manager yielding its URL)."""
    from edgevl.serve.app import create_app
    from tests.serve_helpers import running
    return running(create_app(pipe, "tiny"))


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body}, timeout=120)


def ok(url: str, **body) -> dict:
    r = post(url, **body)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def stream_events(url: str, **body) -> list[dict]:
    r = post(url, stream=True, **body)
    assert r.status_code == 200, r.text[:500]
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def refused(url: str, field: str, status: int = 400, **body) -> str:
    error = assert_error_shape(post(url, **body), status)
    assert error["param"] == field and field in error["message"] and one_sentence(error["message"]), error
    return error["message"]
