"""Function tools through the model's own chat template: definitions in, `<tool_call>` blocks out.

Templates that take `tools` (Qwen2.5's and the Hermes format many fine-tunes use) describe the functions in the
system turn and ask the model to answer with blocks of

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

`ToolCallParser` turns the generated text, delta by delta, into content text and tool calls (a block that is not
such JSON stays content, as vLLM's parser leaves it); `calls_grammar` is the Lark grammar (runtime/constrained.py)
that makes the model write such blocks for tool_choice "required" or a named function. Qwen2-VL's and
Qwen2.5-VL's own templates take no tools: a request with tools is then refused (app.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from edgevl.runtime.constrained import json_rule
from edgevl.serve.errors import ApiError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str        # JSON text, as OpenAI returns it
    id: str


def template_tools(tools) -> list[dict]:
    """schemas.Tool list -> the dicts a chat template reads (`tool.function.name`, `.parameters`, ...)."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def message_tool_fields(index: int, message) -> dict:
    """A message's tool_calls / tool_call_id in the chat template's form (arguments as objects, as transformers
    documents them), or {}."""
    if message.tool_call_id is not None:
        return {"tool_call_id": message.tool_call_id}
    if not message.tool_calls:
        return {}
    calls = []
    for k, call in enumerate(message.tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            where = f"messages.{index}.tool_calls.{k}.function.arguments"
            raise ApiError(400, f"{where} is not JSON text.", param=where) from None
        calls.append({"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": arguments}})
    return {"tool_calls": calls}


def calls_grammar(tools, only: str | None, parallel: bool, content_schema: dict | None = None) -> str:
    """Lark for a reply of tool-call blocks: of any of `tools` (or only the one named `only`), one block or (with
    `parallel`) several. content_schema: a JSON reply is allowed instead (tool_choice auto + response_format)."""
    chosen = [t for t in tools if only is None or t.function.name == only]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": t.function.parameters or {"type": "object"}}} for t in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    blocks = 'block ("\\n" block)*' if parallel and only is None else "block"
    start = f"{blocks} | {json_rule(content_schema)}" if content_schema is not None else blocks
    return (f"start: {start}\n"
            f'block: "{TOOL_OPEN}\\n" {json_rule(schema)} "\\n{TOOL_CLOSE}"\n')


class ToolCallParser:
    """Text deltas -> pieces of content (str) and ParsedCalls, in order. Text that may be the start of a block is
    held until it is known; so is whitespace at the end of content, which is dropped when a call follows it or
    ends the reply (the blank lines a model puts around its blocks): the pieces are the same however the text
    is cut into deltas."""

    def __init__(self):
        self.held, self.inside, self.blank, self.calls = "", False, "", 0

    def feed(self, delta: str) -> list:
        self.held += delta
        out = []
        while True:
            if self.inside:
                end = self.held.find(TOOL_CLOSE)
                if end < 0:
                    return out
                body, self.held, self.inside = self.held[:end], self.held[end + len(TOOL_CLOSE):], False
                out += self._block(body)
                continue
            start = self.held.find(TOOL_OPEN)
            if start < 0:
                keep = _partial_tail(self.held, TOOL_OPEN)
                text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return out + self._content(text)
            out += self._content(self.held[:start])
            self.held, self.inside = self.held[start + len(TOOL_OPEN):], True

    def finish(self) -> list:
        """The end of the reply: a block left open (cut by max_tokens) is content, as it was written."""
        rest = (TOOL_OPEN if self.inside else "") + self.held
        self.held, self.inside = "", False
        out = self._content(rest)
        if self.blank and not self.calls:
            out.append(self.blank)
        self.blank = ""
        return out

    def _content(self, text: str) -> list:
        """Content, its trailing whitespace held back (dropped if a call follows it)."""
        body = text.rstrip()
        if not body:
            self.blank += text
            return []
        out, self.blank = self.blank + body, text[len(body):]
        return [out]

    def _block(self, body: str) -> list:
        try:
            call = json.loads(body)
            name, arguments = call["name"], call["arguments"]
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            return self._content(f"{TOOL_OPEN}{body}{TOOL_CLOSE}")
        self.calls += 1
        self.blank = ""
        return [ParsedCall(name, json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")]


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    return max((n for n in range(1, len(tag)) if text.endswith(tag[:n])), default=0)


def parse_reply(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole reply -> (content or None, calls): the stream parser over it in one delta."""
    parser = ToolCallParser()
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    return (content or None) if calls else content, calls
