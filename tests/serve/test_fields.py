"""`edgevl serve`'s OpenAI request fields beyond sampling: each honoured or refused by name.

logprobs / top_logprobs (checked against a direct decoder run), stream_options.include_usage (the openai client),
logit_bias and the frequency / presence penalties (against the same run with the adjustment by hand), and the
table of every field of the OpenAI client's request type (serve/fields.py). response_format and tools:
tests/serve/test_output.py and tests/serve/test_tools.py.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest

from edgevl.artifact import names
from edgevl.runtime.generate import Prompt, decode_one_token, prefill
from edgevl.runtime.logprobs import log_softmax
from edgevl.runtime.sampling import apply_repetition_penalty
from tests.openai_requests import MESSAGES, ok, refused, server_for, stream_events

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def serial_base(standard_pipeline):
    """The standard variant's pipeline: one request at a time through Pipeline.generate_prepared."""
    with server_for(standard_pipeline) as url:
        yield url


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
    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}     # nor in a message or part
    refused(base, "messages.0.content.0.cache_control", messages=[{"role": "user", "content": [part]}])
    refused(base, "messages.1.refusal", messages=[MESSAGES[0], {"role": "assistant", "content": "", "refusal": "no"}])
    back = {"role": "assistant", "content": "Hello.", "refusal": None, "audio": None, "function_call": None,
            "annotations": []}                          # a reply's message sent back as it came: taken
    assert ok(base, max_tokens=2, temperature=0, messages=[MESSAGES[0], back, MESSAGES[0]])["choices"]
    # The honoured values of the partly honoured fields and the fields with no effect on the reply are taken.
    inert = {"store": False, "service_tier": "auto", "modalities": ["text"], "user": "u-1", "safety_identifier": "s",
             "metadata": {"team": "a"}, "prompt_cache_key": "k", "n": 1, "audio": None}
    assert ok(base, max_tokens=2, temperature=0, **inert)["choices"][0]["message"]["content"]


def test_the_docs_list_every_field_as_the_table_does():
    from pathlib import Path

    from edgevl.serve.fields import HONOURED, REFUSED
    rows = {}
    for line in (Path(__file__).parents[2] / "docs" / "serve.md").read_text().splitlines():
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
