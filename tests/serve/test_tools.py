"""`edgevl serve`'s tools (serve/tools.py), through a chat template that takes them: `<tool_call>` blocks parsed into
tool_calls, tool_choice required / a named function constrained, tool turns rendered by the template; refused by name
where the template takes none.
"""

from __future__ import annotations

import json

import pytest

from tests.openai_requests import MESSAGES, PERSON, is_person, ok, refused, server_for


openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


# Qwen2.5-Instruct's text chat template (tools in the system turn, <tool_call> blocks, tool turns as
# <tool_response>): the model of a fine-tune whose template takes tools.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% else %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant{% if message.content %}
{{ message.content }}{% endif %}
{%- for tool_call in message.tool_calls %}{% set call = tool_call.function %}
<tool_call>
{"name": "{{ call.name }}", "arguments": {{ call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}
<tool_response>
{{ message.content }}
</tool_response>{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def tools_pipe(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.inputs.template import ChatTemplate
    pipe = Pipeline.load(tiny_artifact)
    pipe.template = ChatTemplate(TOOLS_TEMPLATE)
    return pipe


@pytest.fixture(scope="module")
def tools_base(tools_pipe):
    with server_for(tools_pipe) as url:
        yield url


def test_tools_are_refused_when_the_chat_template_takes_none(base, pipeline):
    assert not pipeline.template.takes("tools")
    message = refused(base, "tools", tools=[WEATHER])
    assert "chat template has no tool support" in message
    refused(base, "tools", tools=[WEATHER], tool_choice="required")
    turns = MESSAGES + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    refused(base, "messages", messages=turns)
    # tool_choice none: the tools are not given to the model, which is what "none" asks.
    assert ok(base, max_tokens=3, temperature=0, tools=[WEATHER], tool_choice="none")["choices"][0]["message"]["content"]


def _check_call(call: dict, tools=(WEATHER, CLOCK)) -> dict:
    assert call["type"] == "function" and call["id"].startswith("call_")
    tool = {t["function"]["name"]: t["function"] for t in tools}[call["function"]["name"]]
    arguments = json.loads(call["function"]["arguments"])
    props = tool["parameters"]["properties"]
    assert set(arguments) == set(tool["parameters"]["required"])
    for key, value in arguments.items():
        if "enum" in props[key]:
            assert value in props[key]["enum"]
        else:
            assert type(value) is int and props[key]["minimum"] <= value <= props[key]["maximum"]
    return arguments


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}])
def test_required_tool_calls_are_parsed_into_tool_calls(tools_base, sampling):
    choice = ok(tools_base, max_tokens=200, tools=[WEATHER, CLOCK], tool_choice="required", **sampling)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    assert choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        _check_call(call)


def test_a_named_function_is_called_once(tools_base):
    named = {"type": "function", "function": {"name": "get_time"}}
    for parallel in (True, False):
        choice = ok(tools_base, max_tokens=100, temperature=0, tools=[WEATHER, CLOCK], tool_choice=named,
                    parallel_tool_calls=parallel)["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert len(calls) == 1 and calls[0]["function"]["name"] == "get_time" and choice["finish_reason"] == "tool_calls"
        _check_call(calls[0])


def test_streamed_tool_calls_equal_the_whole_reply(tools_base):
    client = openai.OpenAI(base_url=f"{tools_base}/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0, tools=[WEATHER, CLOCK],
                  tool_choice="required")
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            reasons.append(chunk.choices[0].finish_reason)
            assert not chunk.choices[0].delta.content
            for delta in chunk.choices[0].delta.tool_calls or ():
                calls.setdefault(delta.index, [delta.function.name, ""])[1] += delta.function.arguments
    assert reasons[-1] == "tool_calls"
    assert [[c.function.name, c.function.arguments] for c in whole.message.tool_calls] == \
           [calls[i] for i in sorted(calls)]


def test_tool_choice_auto_gives_the_model_the_tools(tools_base, tools_pipe):
    with_tools = ok(tools_base, max_tokens=4, temperature=0, tools=[WEATHER])
    without = ok(tools_base, max_tokens=4, temperature=0)
    rendered = tools_pipe.template.render(MESSAGES, tools=[WEATHER])
    assert '"name": "get_weather"' in rendered
    assert with_tools["usage"]["prompt_tokens"] == len(tools_pipe.tokenizer.encode(rendered))
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    assert isinstance(with_tools["choices"][0]["message"]["content"], str)   # random weights: no call here
    # With response_format, auto means a tool call or the JSON reply: either way it is one of the two.
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    choice = ok(tools_base, max_tokens=200, temperature=0, tools=[WEATHER], response_format=fmt)["choices"][0]
    assert choice["message"].get("tool_calls") or is_person(json.loads(choice["message"]["content"]))


def test_a_conversation_with_tool_turns_is_rendered_by_the_template(tools_base, tools_pipe):
    turns = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 24 C"}]
    body = ok(tools_base, max_tokens=4, temperature=0, tools=[WEATHER], messages=turns)
    rendered = tools_pipe.template.render(
        [MESSAGES[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny, 24 C"}], tools=[WEATHER])
    assert '"arguments": {"city": "Rome", "days": 2}' in rendered and "<tool_response>\nsunny, 24 C" in rendered
    assert body["usage"]["prompt_tokens"] == len(tools_pipe.tokenizer.encode(rendered))
    bad = [*turns[:1], {**turns[1], "tool_calls": [{**turns[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]
    refused(tools_base, "messages.1.tool_calls.0.function.arguments", tools=[WEATHER], messages=bad)


@pytest.mark.parametrize("body, field", [
    ({"tool_choice": "auto"}, "tool_choice"),                                    # without tools
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),  # auto cannot hold it to one
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "assistant"}]}, "messages.0.content")])
def test_bad_tool_fields_are_refused_by_name(tools_base, body, field):
    refused(tools_base, field, **body)


def test_the_tool_call_parser_is_the_same_delta_by_delta():
    from edgevl.serve.tools import ParsedCall, ToolCallParser, parse_reply
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>not json</tool_call> <tool')
    content, calls = parse_reply(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    # Blank lines before and between the calls go; the one before the block that is no call stays with it.
    assert content == "Let me check.\n<tool_call>not json</tool_call> <tool"
    for size in (1, 2, 3, 7):
        parser = ToolCallParser()
        pieces = [p for i in range(0, len(text), size) for p in parser.feed(text[i:i + size])] + parser.finish()
        assert "".join(p for p in pieces if isinstance(p, str)) == content
        assert [(c.name, c.arguments) for c in pieces if isinstance(c, ParsedCall)] == \
               [(c.name, c.arguments) for c in calls]
    assert parse_reply("\n<tool_call>\n" + '{"name": "f", "arguments": {}}' + "\n</tool_call>\n")[0] is None
    assert parse_reply('<tool_call>\n{"name": "f", "arguments"') == ('<tool_call>\n{"name": "f", "arguments"', [])
    for plain in ("  ", "a <tool_ b\n", "x</tool_call>\n\n", "<tool_call"):       # no call: the text as it is
        assert parse_reply(plain) == (plain, [])
