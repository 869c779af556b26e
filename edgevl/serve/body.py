"""The server's request: its JSON body read into a validated ChatCompletionRequest (schemas.py), pydantic's errors
as one sentence each, and its messages turned into the chat template's content lists with their images and videos
(requests.Media: the rules and sentences the Triton model shares).
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from edgevl.serve.errors import ApiError, RequestError, clip, sentence
from edgevl.serve.requests import Media, RequestLimits
from edgevl.serve.schemas import ChatCompletionRequest, FieldProblem
from edgevl.serve.tools import message_tool_fields

_UNION_TAG = re.compile(r"[\[\]()]|^[A-Z]")


def parse_body(body: bytes) -> ChatCompletionRequest:
    """The raw request body -> a validated request; every problem is an ApiError(400) with one sentence."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); JSON must be UTF-8.") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply.") from None
    except ValueError as e:   # JSONDecodeError, and int() refusing numbers of thousands of digits
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{where}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {_json_kind(data)}.")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_api_error(e.errors()) from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply.") from None


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def validation_api_error(errors: list) -> ApiError:
    """pydantic's first error -> one sentence naming the field (`messages.0.content`, `temperature`).

    For a union (`content`: a string or a list of parts) pydantic reports every member; the deepest
    error under the first error's field is the member the value was meant for."""
    def path(error) -> list[str]:
        loc = [str(p) for p in error.get("loc", ())]
        return loc[1:] if loc[:1] == ["body"] else loc          # FastAPI's prefix
    field = path(errors[0])[:1]
    first = max((e for e in errors if path(e)[:1] == field), key=lambda e: len(path(e)))
    # Union members appear in the path as type names ("str", "list[ContentPart]", "function-after[...]").
    loc = [p for p in path(first) if not (_UNION_TAG.search(p) or p in ("str", "int", "float", "bool"))]
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, FieldProblem) and error.field:   # a check of several fields names the one it is about
        loc.append(error.field)
    where = ".".join(loc) or "the request body"
    if isinstance(error, FieldProblem):   # the shared validation's own words (sampling values, text)
        return ApiError(400, sentence(f"{where} {error}"), param=where)
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{clip(where)} is not a field this server knows; it takes OpenAI's chat-completions "
                             f"fields, and refuses the ones it does not implement.", param=where)
    return ApiError(400, sentence(f"{clip(where)}: {first.get('msg', 'invalid value')}"), param=where)


def to_hf_messages(request: ChatCompletionRequest, limits: RequestLimits) -> tuple[list[dict], Media]:
    """The validated request's messages -> the chat template's (content lists) and their Media (headers read,
    nothing decoded: run it off the event loop, it reads files and parses containers)."""
    media, messages = Media(limits), []
    for i, m in enumerate(request.messages):
        extra = message_tool_fields(i, m)         # an assistant turn's tool_calls, a tool turn's tool_call_id
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content or "", **extra})
            continue
        content = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
                continue
            where = f"messages.{i}.content.{j}.{part.type}"
            url = part.image_url if part.type == "image_url" else part.video_url
            if url is None:
                raise RequestError(f"the {part.type} content part has no {part.type}.", param=where)
            content.append(media.url_part(part.type, url.url, f"{where}.url"))
        messages.append({"role": m.role, "content": content, **extra})
    return messages, media
