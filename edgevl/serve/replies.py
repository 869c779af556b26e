"""The bodies of a reply, in OpenAI's shapes: a chat.completion, or the chat.completion.chunk events of a stream.

Per the request's ReplyPlan (output.py): `logprobs.content` entries (token text, logprob, UTF-8 bytes, the
most likely alternatives), `tool_calls` parsed from `<tool_call>` blocks (finish_reason "tool_calls"), and for a
stream with `stream_options.include_usage` a last chunk with the usage and no choices (every other chunk then
has `"usage": null`, as OpenAI sends them).
"""

from __future__ import annotations

import json
import time

from edgevl.serve.output import ReplyPlan
from edgevl.serve.tools import ParsedCall, ToolCallParser, parse_reply


def token_text(raw: bytes) -> str:
    """A token's text; a piece of a UTF-8 character is spelled as OpenAI spells it, "bytes:\\xe6\\x97"."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def logprobs_json(entries, tokenizer) -> dict:
    """runtime.logprobs.TokenLogprob list -> OpenAI's choice `logprobs` object."""
    def one(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def usage(result) -> dict:
    prompt, completion = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.timings.cached_tokens}}


def finish_reason(result, called: bool) -> str:
    if result.finish_reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


def call_json(call: ParsedCall, index: int | None = None) -> dict:
    body = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return body if index is None else {"index": index, **body}


def completion_body(completion_id: str, model: str, result, plan: ReplyPlan, tokenizer=None) -> dict:
    content, calls = parse_reply(result.text) if plan.parse_tools else (result.text, [])
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call_json(c) for c in calls]
    choice = {"index": 0, "message": message,
              "logprobs": logprobs_json(result.logprobs or [], tokenizer) if plan.logprobs else None,
              "finish_reason": finish_reason(result, bool(calls))}
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(result)}


class StreamReply:
    """The server-sent events of one streamed reply: `start()` (the role chunk), `text(delta)` and
    `logprobs(entries)` as the job reports them, `done(result)` (what is left, the finish chunk, the usage chunk,
    [DONE]). Logprobs go out with the next chunk after them; `done` sends the reply's entries not sent yet."""

    def __init__(self, completion_id: str, model: str, plan: ReplyPlan, tokenizer=None):
        self.id, self.model, self.plan, self.tokenizer = completion_id, model, plan, tokenizer
        self.parser = ToolCallParser() if plan.parse_tools else None
        self.pending, self.sent, self.calls = [], 0, 0

    def start(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def logprobs(self, entries: list) -> None:
        self.pending += entries

    def text(self, delta: str) -> list[str]:
        return [self._piece(p) for p in (self.parser.feed(delta) if self.parser else [delta])]

    def done(self, result) -> list[str]:
        out = [self._piece(p) for p in (self.parser.finish() if self.parser else [])]
        self.pending = list((result.logprobs or [])[self.sent:]) if self.plan.logprobs else []
        out.append(self._chunk({}, finish_reason(result, self.calls > 0)))
        if self.plan.include_usage:
            out.append(_event({"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": self.model, "choices": [], "usage": usage(result)}))
        return out + ["data: [DONE]\n\n"]

    def _piece(self, piece) -> str:
        if isinstance(piece, ParsedCall):
            self.calls += 1
            return self._chunk({"tool_calls": [call_json(piece, self.calls - 1)]})
        return self._chunk({"content": piece})

    def _chunk(self, delta: dict, reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        if self.plan.logprobs:
            choice["logprobs"] = logprobs_json(self.pending, self.tokenizer) if self.pending else None
            self.sent, self.pending = self.sent + len(self.pending), []
        body = {"id": self.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [choice]}
        if self.plan.include_usage:
            body["usage"] = None
        return _event(body)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
