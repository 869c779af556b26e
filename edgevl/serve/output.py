"""A request's reply, planned before any work: what the runtime is asked (`OutputOptions`: logprobs, logit
bias, penalties, a grammar), what the chat template gets (tools) and how the reply is shaped (`ReplyPlan`).

Everything a request asks that this model or this installation cannot do is a 400 naming the field here: tools
for a chat template without tool support, token ids outside the vocabulary, a JSON schema llguidance cannot
compile, structured output without llguidance installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevl.runtime.constrained import GrammarUnavailable, json_grammar
from edgevl.runtime.guide import OutputOptions
from edgevl.serve.errors import ApiError
from edgevl.serve.schemas import ChatCompletionRequest, NamedToolChoice
from edgevl.serve.tools import calls_grammar, template_tools

ANY_JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ReplyPlan:
    output: OutputOptions
    tools: list[dict] | None = None      # for the chat template; None: the model is told of no tools
    parse_tools: bool = False            # <tool_call> blocks in the reply become tool_calls
    logprobs: bool = False
    include_usage: bool = False          # streaming: a last chunk with the usage


def plan_reply(request: ChatCompletionRequest, pipe) -> ReplyPlan:
    """The request's plan for `pipe`; ApiError(400) naming the field for what cannot be done."""
    tools_on = bool(request.tools) and request.tool_choice != "none"
    if (tools_on or _tool_turns(request)) and not pipe.template.takes("tools"):
        field = "tools" if tools_on else "messages"
        raise ApiError(400, f"{field}: this model's chat template has no tool support (it never reads `tools`), so "
                            f"the model cannot be told of functions; send the request without tools.", param=field)
    grammar, field = _grammar(request, tools_on)
    if grammar is not None:
        _check_grammar(pipe, grammar, field)
    output = OutputOptions(top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                           logit_bias=_bias(request, pipe),
                           frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty,
                           grammar=grammar)
    return ReplyPlan(output, template_tools(request.tools) if tools_on else None, tools_on, request.logprobs,
                     bool(request.stream_options and request.stream_options.include_usage))


def _tool_turns(request: ChatCompletionRequest) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in request.messages)


def _content_schema(request: ChatCompletionRequest) -> dict | None:
    """The JSON Schema the reply's content must match (response_format), or None for free text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ANY_JSON_OBJECT
    return fmt.json_schema.json_schema if fmt.json_schema.json_schema is not None else {}


def _grammar(request: ChatCompletionRequest, tools_on: bool) -> tuple[str | None, str]:
    """(Lark grammar or None, the field it comes from)."""
    schema = _content_schema(request)
    choice = request.tool_choice
    must_call = tools_on and (choice == "required" or isinstance(choice, NamedToolChoice))
    if not must_call and not request.parallel_tool_calls and tools_on:
        raise ApiError(400, "parallel_tool_calls false is only taken with tool_choice 'required' or a named "
                            "function (which the reply is then constrained to); send it with one of them or "
                            "leave it out.", param="parallel_tool_calls")
    if must_call:
        if schema is not None:
            raise ApiError(400, "response_format and tool_choice both constrain the reply (a JSON content or a tool "
                                "call); send one of them.", param="response_format")
        only = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return calls_grammar(request.tools, only, request.parallel_tool_calls), "tool_choice"
    if schema is None:
        return None, ""
    if tools_on:     # tool_choice auto: a tool call or the JSON reply
        return calls_grammar(request.tools, None, True, schema), "response_format"
    return json_grammar(schema), "response_format"


def _check_grammar(pipe, grammar: str, field: str) -> None:
    try:
        problem = pipe.grammars.problem(grammar)
    except GrammarUnavailable:
        raise ApiError(400, f"{field} needs constrained decoding, which needs the llguidance package, not installed "
                            f"on this server; install it with `pip install 'edgevl[serve]'`.", param=field,
                       code="structured_output_unavailable") from None
    if problem:
        where = "response_format.json_schema.schema" if field == "response_format" else "tools"
        raise ApiError(400, f"{where} cannot be used for constrained decoding: {problem.rstrip('.')}.", param=where)


def _bias(request: ChatCompletionRequest, pipe) -> tuple[tuple[int, float], ...]:
    bias = request.logit_bias or {}
    vocab_size = pipe.config.vocab_size if bias else 0
    for token in bias:
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"logit_bias has token id {token}; this model's token ids are 0 to {vocab_size - 1}.",
                           param="logit_bias")
    return tuple(sorted(bias.items()))
