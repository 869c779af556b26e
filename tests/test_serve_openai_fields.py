"""`edgevl serve`'s OpenAI request fields beyond sampling: each honoured or refused by name.

logprobs / top_logprobs (checked against a direct decoder run), stream_options.include_usage (the openai client),
logit_bias and the frequency / presence penalties (against the same run with the adjustment by hand),
response_format by constrained decoding, tools through a chat template that takes them, and the table of every
field of the OpenAI client's request type (serve/fields.py).
"""

from __future__ import annotations

import json
import sys
import typing

import numpy as np
import pytest

from edgevl.artifact import names
from edgevl.runtime.generate import Prompt, decode_one_token, prefill
from edgevl.runtime.logprobs import log_softmax
from edgevl.runtime.sampling import apply_repetition_penalty
from tests.serve_helpers import assert_error_shape, one_sentence, running

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

MESSAGES = [{"role": "user", "content": "Tell me a story about the sea."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}
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


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def base(pipeline):
    from edgevl.serve.app import create_app
    with running(create_app(pipeline, "tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def serial_base(standard_pipeline):
    """The standard variant's pipeline: one request at a time through Pipeline.generate_prepared."""
    from edgevl.serve.app import create_app
    with running(create_app(standard_pipeline, "tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def tools_pipe(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.template import ChatTemplate
    pipe = Pipeline.load(tiny_artifact)
    pipe.template = ChatTemplate(TOOLS_TEMPLATE)
    return pipe


@pytest.fixture(scope="module")
def tools_base(tools_pipe):
    from edgevl.serve.app import create_app
    with running(create_app(tools_pipe, "tiny")) as url:
        yield url


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


# ----------------------------------------------------------------------------- the reference: the decoder alone
def reference(pipe, steps: int, adjust=None, messages=MESSAGES) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's raw logits from the decoder graph called directly (no scheduler, no
    Guide); adjust(logits, tokens so far) changes the logits the token is chosen from, before the repetition
    penalty of the model's generation_config (which greedy requests keep, as `edgevl run` does)."""
    penalty = pipe.sampling_options().repetition_penalty
    ids = pipe.tokenize_messages(messages, [])
    positions, deltas = pipe.positions(ids[None], np.ones_like(ids)[None], [])
    cache = pipe.new_cache(1)
    outputs = prefill(pipe.decoder, cache, Prompt(pipe.embed(ids, [])[None], ids[None], positions, deltas,
                                                  np.array([len(ids)])))
    tokens, logits = [], []
    for _ in range(steps):
        row = np.asarray(outputs[names.LOGITS], np.float32)[0]
        logits.append(row)
        chosen = adjust(row.copy(), tokens) if adjust else row
        chosen = apply_repetition_penalty(chosen[None], np.concatenate([ids, tokens]).astype(np.int64)[None], penalty)
        token = int(np.argmax(chosen))
        tokens.append(token)
        if token in pipe.config.eos_token_id:
            break
        outputs = decode_one_token(pipe.decoder, cache, pipe.embeddings, np.array([token]), deltas)
    return tokens, logits


def reply_tokens(pipe, content: dict) -> list[bytes]:
    return [bytes(e["bytes"]) for e in content]


def assert_matches_reference(pipe, body: dict, top: int, steps: int) -> None:
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    tokens, logits = reference(pipe, steps)
    if tokens[-1] in pipe.config.eos_token_id:       # EOS ends the reply; it is no token of its text
        tokens, logits = tokens[:-1], logits[:-1]
    assert len(entries) == len(tokens) > 0
    for entry, token, row in zip(entries, tokens, logits):
        expected = log_softmax(row)
        assert bytes(entry["bytes"]) == pipe.tokenizer.token_bytes(token)
        assert abs(entry["logprob"] - expected[token]) < 1e-4
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True)
        best = np.argsort(-expected, kind="stable")[:top]
        assert [bytes(a["bytes"]) for a in alternatives] == [pipe.tokenizer.token_bytes(t) for t in best]
        assert np.allclose(values, expected[best], atol=1e-4)
    text = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    assert text == choice["message"]["content"]


# ----------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("which", ["batching", "serial"])
def test_logprobs_are_the_decoders_log_softmax(which, pipeline, standard_pipeline, base, serial_base):
    pipe, url = (pipeline, base) if which == "batching" else (standard_pipeline, serial_base)
    body = ok(url, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    assert_matches_reference(pipe, body, top=5, steps=12)
    plain = ok(url, max_tokens=12, temperature=0)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]  # same tokens


@pytest.mark.parametrize("which", ["batching", "serial"])
def test_streamed_logprobs_follow_their_text(which, base, serial_base):
    url = base if which == "batching" else serial_base
    whole = ok(url, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)["choices"][0]
    events = stream_events(url, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    entries, text = [], ""
    for event in events:
        choice = event["choices"][0]
        text += choice["delta"].get("content") or ""
        entries += (choice["logprobs"] or {}).get("content", [])
        sent = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
        assert text.startswith(sent.rstrip("\ufffd")), "a token's logprob came before its text"
    assert text == whole["message"]["content"]
    assert entries == whole["logprobs"]["content"]


def test_logprobs_stop_at_a_stop_string(base, pipeline):
    first = ok(base, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    stop = first.split()[2]
    body = ok(base, max_tokens=12, temperature=0, logprobs=True, stop=[stop])["choices"][0]
    assert body["finish_reason"] == "stop" and stop not in body["message"]["content"]
    # The reply's tokens: the last one may reach into the stop string (its text begins before it), no more.
    entries = body["logprobs"]["content"]
    text = b"".join(bytes(e["bytes"]) for e in entries).decode()
    assert text.startswith(body["message"]["content"]) and len(text) < len(first)
    assert len(b"".join(bytes(e["bytes"]) for e in entries[:-1]).decode()) < len(body["message"]["content"])


def test_logprobs_with_sampling_report_the_raw_distribution(base, pipeline):
    body = ok(base, max_tokens=8, temperature=1.5, top_p=0.5, seed=5, logprobs=True)["choices"][0]
    entries = body["logprobs"]["content"]
    assert entries and all(e["logprob"] <= 0 and e["top_logprobs"] == [] for e in entries)
    # The first token's logprob is the prompt's raw distribution, whatever temperature and top_p did.
    tokens, logits = reference(pipeline, 1)
    by_bytes = {pipeline.tokenizer.token_bytes(t): lp for t, lp in enumerate(log_softmax(logits[0]))}
    assert abs(entries[0]["logprob"] - by_bytes[bytes(entries[0]["bytes"])]) < 1e-4


@pytest.mark.parametrize("body, field", [
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs")])
def test_bad_logprobs_fields_are_refused_by_name(base, body, field):
    refused(base, field, **body)


# ----------------------------------------------------------------------------- stream_options
def test_include_usage_sends_a_last_chunk_with_the_usage(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    plain = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                stream=True))
    assert plain[-1].choices and all(c.usage is None for c in plain)
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert whole.usage.prompt_tokens == last.usage.prompt_tokens


@pytest.mark.parametrize("body, field", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),          # OpenAI: only with stream
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x")])
def test_bad_stream_options_are_refused_by_name(base, body, field):
    refused(base, field, **body)


# ----------------------------------------------------------------------------- logit_bias and penalties
def test_logit_bias_moves_the_choice_as_the_same_bias_by_hand(base, pipeline):
    tokens, _ = reference(pipeline, 1)
    bias = {tokens[0]: -100.0, 7: 5.0}

    def by_hand(logits, _tokens):
        for token, value in bias.items():
            logits[token] += value
        return logits
    body = ok(base, max_tokens=6, temperature=0, logprobs=True, logit_bias={str(k): v for k, v in bias.items()})
    expected, _ = reference(pipeline, 6, by_hand)
    got = reply_tokens(pipeline, body["choices"][0]["logprobs"]["content"])
    assert got == [pipeline.tokenizer.token_bytes(t) for t in expected][:len(got)] and got[0] != tokens[0]
    forced = ok(base, max_tokens=4, temperature=0, logit_bias={"71": 100})["choices"][0]["message"]["content"]
    assert forced == pipeline.tokenizer.decode([71] * 4)


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (-2.0, 0.5)])
def test_penalties_are_openais_over_the_reply(base, pipeline, frequency, presence):
    def by_hand(logits, tokens):
        for token in set(tokens):
            logits[token] -= tokens.count(token) * frequency + presence
        return logits
    body = ok(base, max_tokens=20, temperature=0, logprobs=True, frequency_penalty=frequency,
              presence_penalty=presence)
    expected, _ = reference(pipeline, 20, by_hand)
    got = reply_tokens(pipeline, body["choices"][0]["logprobs"]["content"])
    assert got == [pipeline.tokenizer.token_bytes(t) for t in expected][:len(got)] and len(got) >= 19


@pytest.mark.parametrize("body, field", [
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias.x"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty")])
def test_bad_bias_and_penalties_are_refused_by_name(base, body, field):
    refused(base, field, **body)


# ----------------------------------------------------------------------------- response_format
def _is_person(value) -> bool:
    p = PERSON["properties"]
    return (isinstance(value, dict) and set(PERSON["required"]) <= set(value) <= set(p)
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and type(value["age"]) is int and 0 <= value["age"] <= 120 and isinstance(value["ok"], bool)
            and (isinstance(value.get("tags", []), list) and len(value.get("tags", [])) <= 3
                 and all(t in ("a", "b", "c") for t in value.get("tags", []))))


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1},
                                      {"temperature": 2.0, "seed": 7}, {"temperature": 1.2, "top_p": 0.9, "seed": 3}])
def test_json_schema_replies_parse_and_match_the_schema(base, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choice = ok(base, max_tokens=120, response_format=fmt, **sampling)["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert _is_person(json.loads(choice["message"]["content"])), choice["message"]["content"]


def test_json_replies_stream_and_take_logprobs(base):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    events = stream_events(base, max_tokens=120, temperature=0.8, seed=11, response_format=fmt, logprobs=True)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert _is_person(json.loads(text))
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
    from edgevl.serve.requests import parse_request
    monkeypatch.setitem(sys.modules, "llguidance", None)          # `import llguidance` fails

    class Stub:
        template, config = pipeline.template, pipeline.config

        @property
        def grammars(self):
            return GrammarCompiler(pipeline.tokenizer.impl.to_str(), 2100, (0,))
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}):
        request = parse_request(json.dumps({"model": "tiny", "messages": MESSAGES, "response_format": fmt}).encode())
        with pytest.raises(ApiError) as e:
            plan_reply(request, Stub())
        assert e.value.param == "response_format" and "edgevl[serve]" in e.value.message
        assert one_sentence(e.value.message.replace("`pip install 'edgevl[serve]'`.", "it."))
    plain = parse_request(json.dumps({"model": "tiny", "messages": MESSAGES, "logprobs": True}).encode())
    assert plan_reply(plain, Stub()).output.grammar is None      # nothing else needs it


# ----------------------------------------------------------------------------- tools
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
    assert choice["message"].get("tool_calls") or _is_person(json.loads(choice["message"]["content"]))


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


# ----------------------------------------------------------------------------- every request field
def _openai_request_fields() -> set[str]:
    from openai.types.chat import completion_create_params as params
    return set(typing.get_type_hints(params.CompletionCreateParamsStreaming))


REFUSED_VALUES = {"store": True, "service_tier": "flex", "modalities": ["text", "audio"], "n": 2,
                  "audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f"}], "function_call": "auto",
                  "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
                  "web_search_options": {}, "moderation": {}, "prompt_cache_retention": "24h",
                  "prompt_cache_options": {}}


def test_every_openai_request_field_is_honoured_or_refused_by_name(base):
    from edgevl.serve.fields import HONOURED, REFUSED
    from edgevl.serve.schemas import ChatCompletionRequest
    fields = _openai_request_fields()
    assert "messages" in fields and "stream_options" in fields and len(fields) > 30
    assert not set(HONOURED) & set(REFUSED)
    assert fields <= set(HONOURED) | set(REFUSED), fields - set(HONOURED) - set(REFUSED)
    assert set(ChatCompletionRequest.model_fields) == set(HONOURED) | set(REFUSED)   # nothing accepted unlisted
    for field in REFUSED:
        refused(base, field, **{field: REFUSED_VALUES[field]})
    for field in ("store", "service_tier", "modalities", "n"):          # honoured values only
        refused(base, field, **{field: REFUSED_VALUES[field]})
    message = refused(base, "frobnicate", frobnicate=1)                   # not OpenAI's at all
    assert "not a field this server knows" in message
    # The honoured values of the partly honoured fields and the fields with no effect on the reply are taken.
    inert = {"store": False, "service_tier": "auto", "modalities": ["text"], "user": "u-1", "safety_identifier": "s",
             "metadata": {"team": "a"}, "prompt_cache_key": "k", "n": 1, "audio": None}
    assert ok(base, max_tokens=2, temperature=0, **inert)["choices"][0]["message"]["content"]


def test_the_docs_list_every_field_as_the_table_does():
    from pathlib import Path

    from edgevl.serve.fields import HONOURED, REFUSED
    rows = {}
    for line in (Path(__file__).parents[1] / "docs" / "serve.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[1] in ("honoured", "refused"):
            rows[cells[0].strip("`")] = cells[1]
    assert rows == {**{f: "honoured" for f in HONOURED}, **{f: "refused" for f in REFUSED}}


def test_the_reply_shape_is_openais(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == reply.choices[0].message.content or \
        any(t.token.startswith("bytes:") for t in content)

