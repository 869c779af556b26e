"""`/metrics`: the scheduler's events (runtime/jobs.Observer) as Prometheus metrics, via prometheus-client.

    edgevl_requests_total{outcome}               completed | cancelled (client went away) | failed | rejected (429)
    edgevl_queue_length                          accepted, waiting for a batch row (being prepared included)
    edgevl_batch_rows / edgevl_batch_rows_max    requests holding a KV-cache row / --max-batch
    edgevl_decode_step_rows                      histogram: rows decoded together per decode step
    edgevl_decode_step_seconds                   histogram: time of one decode step
    edgevl_prompt_tokens_total, edgevl_generation_tokens_total
    edgevl_generation_tokens_per_second          tokens generated over the last 10 s, per second
    edgevl_time_to_first_token_seconds           histogram: request accepted -> first token
    edgevl_time_per_output_token_seconds         histogram: between two tokens of one request
    edgevl_request_duration_seconds              histogram: accepted -> finished

Each app has its own registry (several servers in one process, as in the tests, do not share counts).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from edgevl.serve.scheduler.jobs import Observer

OUTCOMES = ("completed", "cancelled", "failed", "rejected")
WINDOW_S = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServerMetrics(Observer):
    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgevl_requests", "Requests by outcome: completed, cancelled (the client went "
                                "away), failed, rejected (the queue was full: HTTP 429).", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.queue = Gauge("edgevl_queue_length", "Requests accepted and waiting for a batch row.", registry=r)
        self.rows = Gauge("edgevl_batch_rows", "Requests holding a KV-cache row (prefilling or decoding).",
                          registry=r)
        Gauge("edgevl_batch_rows_max", "Rows decoded together at most (--max-batch).", registry=r).set(max_batch)
        self.step_rows = Histogram("edgevl_decode_step_rows", "Rows decoded together per decode step.",
                                   buckets=ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("edgevl_decode_step_seconds", "Time of one decode step of the batch.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("edgevl_prompt_tokens", "Prompt tokens of completed requests.", registry=r)
        self.cached = Counter("edgevl_prompt_tokens_cached", "Prompt tokens whose KV came from a row's prefix cache "
                              "(--prefix-cache) instead of a prefill.", registry=r)
        self.generated = Counter("edgevl_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("edgevl_time_to_first_token_seconds", "From a request's acceptance to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("edgevl_time_per_output_token_seconds", "Between two tokens of one request.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("edgevl_request_duration_seconds", "From a request's acceptance to its end.",
                                  buckets=DURATION_BUCKETS, registry=r)
        rate = Gauge("edgevl_generation_tokens_per_second",
                     f"Tokens generated over the last {WINDOW_S:g} s, per second.", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        rate.set_function(self.tokens_per_second)

    # -- Observer
    def queue_length(self, waiting: int) -> None:
        self.queue.set(waiting)

    def batch_rows(self, rows: int) -> None:
        self.rows.set(rows)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.step_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def tokens(self, count: int) -> None:
        self.generated.inc(count)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))
            self._forget(now)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def cached_tokens(self, count: int) -> None:
        self.cached.inc(count)

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.duration.observe(seconds)

    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    # -- the rate
    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            return sum(n for _, n in self._recent) / WINDOW_S

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
