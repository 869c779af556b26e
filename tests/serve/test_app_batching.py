"""`edgevl serve` with continuous batching: concurrent clients against a real uvicorn server on a loopback port.

The tiny model decodes a token in well under a millisecond, so its decoder here pauses 10 ms per decode step:
requests then really overlap (the pause only slows the test, it decides nothing; no assertion is on time).
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from edgevl.artifact import names
from tests.serve_helpers import assert_error_shape, one_sentence, running

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

LONG = "Describe a cat."          # the tiny model's greedy answer runs past 300 tokens without EOS
PAUSE_S = 0.01


class SlowDecoder:
    """The decoder runner with a pause before each decode step (S = 1); everything else is the runner's."""

    def __init__(self, decoder, pause: float):
        self.decoder, self.pause = decoder, pause

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def infer(self, feed, bindings=None):
        if feed[names.INPUTS_EMBEDS].shape[1] == 1:
            time.sleep(self.pause)
        return self.decoder.infer(feed, bindings)


@pytest.fixture(scope="module")
def slow_pipeline(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    pipe = Pipeline.load(tiny_artifact)
    pipe.decoder = SlowDecoder(pipe.decoder, PAUSE_S)
    return pipe


def serve(pipe, **settings):
    from edgevl.serve.app import ServerSettings, create_app
    return running(create_app(pipe, "tiny", ServerSettings(**settings)))


@pytest.fixture(scope="module")
def live(slow_pipeline):
    with serve(slow_pipeline, max_batch=4, max_queue=2, prefill_chunk=16) as base:
        yield base


def data_url(path) -> str:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(text, image=None, max_tokens=10, **extra) -> dict:
    content = text if image is None else [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": text}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def complete(base, request) -> dict:
    r = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(base, request) -> tuple[str, str]:
    """(text, finish_reason) of a streamed reply."""
    text, reason = [], None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**request, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["delta"].get("content") or "")
                reason = choice["finish_reason"] or reason
    return "".join(text), reason


def metrics(base) -> dict:
    """/metrics parsed by prometheus_client's own text parser: {(sample name, labels): value}."""
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(r.text) for s in family.samples}


def value(base, name, **labels) -> float:
    return metrics(base)[(name, tuple(sorted(labels.items())))]


def wait_until(check, what: str, limit_s: float = 60):
    deadline = time.time() + limit_s
    while not check():
        if time.time() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- the same tokens as alone
def test_concurrent_requests_get_the_tokens_they_get_alone(live, pipeline, photos):
    """Six clients at once (4 rows, 2 queued) with prompts of different lengths and images: each reply equals
    the same request served alone, and the runtime's own greedy answer."""
    requests = [body(LONG, max_tokens=24), body("What is in this picture?", photos["coffee"], max_tokens=9),
                body("word " * 90 + "Summarize.", max_tokens=14), body("Hi", max_tokens=5),
                body("And this one?", photos["chelsea_odd"], max_tokens=11), body("Count to five.", max_tokens=7)]
    alone = [complete(live, r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: complete(live, r), requests))
    for a, b in zip(alone, together):
        assert b["choices"][0] == a["choices"][0] and b["usage"] == a["usage"]
    for reply, text, n in ((alone[0], LONG, 24), (alone[3], "Hi", 5), (alone[5], "Count to five.", 7)):
        expected = pipeline.generate(text, max_new_tokens=n, do_sample=False)
        assert reply["choices"][0]["message"]["content"] == expected.text
        assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    image = Image.open(photos["coffee"]).convert("RGB")
    expected = pipeline.generate("What is in this picture?", images=[image], max_new_tokens=9, do_sample=False)
    assert alone[1]["choices"][0]["message"]["content"] == expected.text


def test_seeded_sampling_is_reproducible_among_other_requests(live):
    seeded = {**body("Say anything.", max_tokens=12), "temperature": 1.0, "top_p": 0.95, "seed": 11}
    alone = complete(live, seeded)["choices"][0]["message"]["content"]
    mixed = [seeded, body(LONG, max_tokens=20), seeded, {**seeded, "seed": 12}]
    with ThreadPoolExecutor(len(mixed)) as pool:
        replies = [r["choices"][0]["message"]["content"] for r in pool.map(lambda r: complete(live, r), mixed)]
    assert replies[0] == replies[2] == alone
    assert replies[3] != alone


def test_stop_strings_and_streaming_stay_per_request(live):
    prompts = ["Tell me a story.", "Write a haiku.", "Count to five."]
    full = [complete(live, body(p, max_tokens=16))["choices"][0]["message"]["content"] for p in prompts]
    stops = [text[4:7] for text in full]
    requests = [body(p, max_tokens=16, stop=s) for p, s in zip(prompts, stops)] + [body(LONG, max_tokens=16)]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: streamed(live, r), requests))
    for (text, reason), whole, stop in zip(replies, full, stops):
        assert (text, reason) == (whole[:whole.find(stop)], "stop")
    assert replies[3] == (complete(live, body(LONG, max_tokens=16))["choices"][0]["message"]["content"], "length")


# ----------------------------------------------------------------------------- fairness and leaving
def test_a_short_request_joining_a_long_one_finishes_first(live):
    done_before = value(live, "edgevl_requests_total", outcome="completed")
    with httpx.stream("POST", f"{live}/v1/chat/completions", timeout=120,
                      json={**body(LONG, max_tokens=200), "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)   # it decodes
        short = complete(live, body("Hi", max_tokens=3))
        assert short["usage"]["completion_tokens"] == 3
        # The short one is done; the long one, which came first, still holds its row.
        assert value(live, "edgevl_requests_total", outcome="completed") == done_before + 1
        assert value(live, "edgevl_batch_rows") == 1
        assert any(line == "data: [DONE]" for line in lines)
    assert value(live, "edgevl_requests_total", outcome="completed") == done_before + 2


def test_a_disconnected_streaming_client_frees_its_row(live):
    cancelled = value(live, "edgevl_requests_total", outcome="cancelled")
    with httpx.stream("POST", f"{live}/v1/chat/completions", timeout=120,
                      json={**body(LONG, max_tokens=3000), "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert value(live, "edgevl_batch_rows") == 1
    # The client hung up after a few tokens of 3000: its row is freed at the scheduler's next step.
    wait_until(lambda: value(live, "edgevl_requests_total", outcome="cancelled") == cancelled + 1,
               "the cancelled request counted")
    wait_until(lambda: value(live, "edgevl_batch_rows") == 0, "the row freed")
    assert value(live, "edgevl_generation_tokens_total") < 3000
    assert complete(live, body("Hi", max_tokens=2))["usage"]["completion_tokens"] == 2


def test_a_non_streaming_client_that_goes_away_frees_its_row(live):
    cancelled = value(live, "edgevl_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):      # the client gives up after a second and closes the connection
        httpx.post(f"{live}/v1/chat/completions", json=body(LONG, max_tokens=3000), timeout=1.0)
    wait_until(lambda: value(live, "edgevl_requests_total", outcome="cancelled") == cancelled + 1,
               "the cancelled request counted")
    wait_until(lambda: value(live, "edgevl_batch_rows") == 0, "the row freed")


def test_beyond_the_queue_is_a_429(slow_pipeline):
    with serve(slow_pipeline, max_batch=1, max_queue=1) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120,
                          json={**body(LONG, max_tokens=3000), "stream": True}) as r:
            lines = r.iter_lines()          # kept: a dropped httpx line iterator closes the response
            next(lines)                                            # running: the one row is taken
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(complete, base, body("Hi", max_tokens=2))
                wait_until(lambda: value(base, "edgevl_queue_length") == 1, "a request queued")
                for stream in (False, True):
                    reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json=body("Hi", stream=stream))
                    error = assert_error_shape(reply, 429)
                    assert reply.headers["retry-after"] == "1"          # what OpenAI clients back off by
                    assert error["message"] == ("the server is busy (1 running, 1 waiting: --max-batch 1, "
                                                "--max-queue 1); retry later.")
                    assert one_sentence(error["message"]) and error["code"] == "rate_limit_exceeded"
                r.close()                                          # the long one leaves: the queued one runs
                assert queued.result(timeout=60)["usage"]["completion_tokens"] == 2
        assert value(base, "edgevl_requests_total", outcome="rejected") == 2
        assert complete(base, body("Hi", max_tokens=2))["usage"]["completion_tokens"] == 2


# ----------------------------------------------------------------------------- /metrics
def test_metrics_count_what_happened(slow_pipeline):
    with serve(slow_pipeline, max_batch=3) as base:
        empty = metrics(base)
        assert empty[("edgevl_requests_total", (("outcome", "completed"),))] == 0
        assert empty[("edgevl_batch_rows_max", ())] == 3
        replies = [complete(base, body("Hi", max_tokens=4)), complete(base, body(LONG, max_tokens=6))]
        streamed(base, body("Count to five.", max_tokens=5))
        bad = httpx.post(f"{base}/v1/chat/completions", json=body("word " * 40000), timeout=60)
        assert bad.status_code == 400        # refused from its planned cost, before it reached the scheduler
        m = metrics(base)
        completion = sum(r["usage"]["completion_tokens"] for r in replies) + 5
        prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
        assert m[("edgevl_requests_total", (("outcome", "completed"),))] == 3
        assert m[("edgevl_requests_total", (("outcome", "failed"),))] == 0
        assert m[("edgevl_generation_tokens_total", ())] == completion
        assert m[("edgevl_prompt_tokens_total", ())] > prompt         # and the streamed request's
        assert m[("edgevl_time_to_first_token_seconds_count", ())] == 3
        assert m[("edgevl_time_per_output_token_seconds_count", ())] == completion - 3
        assert m[("edgevl_request_duration_seconds_count", ())] == 3
        assert m[("edgevl_decode_step_rows_count", ())] == completion - 3   # alone: one step per later token
        assert m[("edgevl_generation_tokens_per_second", ())] > 0
        assert m[("edgevl_queue_length", ())] == 0 and m[("edgevl_batch_rows", ())] == 0


def test_prefix_cache_reports_the_reused_tokens_of_a_resent_conversation(pipeline, photos):
    """`--prefix-cache`: a chat resending its history (image included) reuses the cached positions and says how
    many in usage.prompt_tokens_details.cached_tokens, as OpenAI's API does; without it the field is 0."""
    first = body("What is in this picture?", photos["coffee"], max_tokens=6)
    with serve(pipeline, max_batch=2, max_queue=2, prefix_cache=True) as base:
        one = complete(base, first)
        history = [*first["messages"], {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                   {"role": "user", "content": "And the colour?"}]
        two = complete(base, {**first, "messages": history})
        assert value(base, "edgevl_prompt_tokens_cached_total") == two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"]
    with serve(pipeline, max_batch=2, max_queue=2) as base:
        fresh = complete(base, {**first, "messages": history})
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert fresh["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]
