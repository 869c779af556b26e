"""What a scheduler takes and reports, whichever runs: `Job`, `Observer`, `QueueFull`, `RequestCancelled`, the
server's default sizes, `SchedulerBase` (accepting a job under the queue bound, reporting, settling it) and
`SerialScheduler` (one request at a time, any decoder). The continuous-batching
scheduler is batching.py; `batching.make_scheduler` picks one of the two for a pipeline.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from edgevl.errors import EdgevlError
from edgevl.serve.scheduler.heap import trim_heap
from edgevl.runtime.generate import Decoding

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 32
DEFAULT_PREFILL_CHUNK = 256


class RequestCancelled(Exception):
    """The job's client went away (`Job.cancel`) or the scheduler closed before the job finished."""


class QueueFull(Exception):
    """Refused at `submit`: `max_batch` jobs are running and `max_queue` more are waiting."""

    def __init__(self, running: int, waiting: int, max_batch: int, max_queue: int):
        super().__init__(f"{running} running, {waiting} waiting")
        self.running, self.waiting, self.max_batch, self.max_queue = running, waiting, max_batch, max_queue


@dataclass(eq=False)
class Job:
    """One request. `prepare` runs on the preparing thread (video decoding, preprocessing, tokens) and returns a
    `PreparedPrompt`; on the scheduler thread `on_start()` is called once its first token exists (everything
    that can fail because of the request has run), `on_text(delta)` as text is generated and, when its decoding
    asks for logprobs, `on_logprobs(entries)` just before each delta with the entries of the tokens it holds (the rest
    are in the Result); `future` ends with the `Result`, or the request's exception (`RequestCancelled` once
    cancelled)."""

    prepare: Callable[[], object]
    decoding: Decoding                              # sampling, length, stop strings, output options (validated)
    on_text: Callable[[str], None] | None = None
    on_start: Callable[[], None] | None = None
    on_logprobs: Callable[[list], None] | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """The client went away: the job leaves at the scheduler's next step (its row is freed)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Observer:
    """What a scheduler reports, each as it happens; these defaults ignore it (serve/metrics.py counts it)."""

    def queue_length(self, waiting: int) -> None: ...                      # accepted, not yet in a row
    def batch_rows(self, rows: int) -> None: ...                           # jobs holding a row
    def decode_step(self, rows: int, seconds: float) -> None: ...          # rows decoded together, the step's time
    def tokens(self, count: int) -> None: ...                              # tokens generated
    def cached_tokens(self, count: int) -> None: ...                       # prompt tokens taken from a row's cache
    def first_token(self, seconds: float) -> None: ...                     # submit -> first token
    def token_gap(self, seconds: float) -> None: ...                       # between two tokens of one job
    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None: ...
    def rejected(self) -> None: ...                                        # QueueFull


class SchedulerBase:
    """What every scheduler does the same way: admit jobs up to max_batch + max_queue held, report the queue,
    settle a finished job. A scheduler sets `max_batch`, `max_queue`, `observer`, `jobs` (accepted, not
    finished), a re-entrant `lock` and `closed`, and says how many jobs are `running`."""

    running: int

    @property
    def queue_length(self) -> int:
        return len(self.jobs) - self.running

    def check_room(self) -> None:
        """QueueFull (counted as a rejection) when max_batch + max_queue jobs are held: a server asks before it
        decodes a request's images; `submit` checks again."""
        with self.lock:
            if len(self.jobs) >= self.max_batch + self.max_queue:
                running = self.running
                self.observer.rejected()
                raise QueueFull(running, len(self.jobs) - running, self.max_batch, self.max_queue)

    def _accept(self, job: Job) -> None:
        """Accept `job` (RequestCancelled once closed, QueueFull when full)."""
        with self.lock:
            if self.closed:
                raise RequestCancelled("the scheduler is closed")
            self.check_room()
            self.jobs.add(job)
            self._report()

    def _settle(self, job: Job, result, error: BaseException | None, outcome: str, completion_tokens: int) -> None:
        """Count a job that has left `jobs` and end its future with `result` or `error`."""
        prompt_tokens = len(result.prompt_token_ids) if result is not None else 0
        self.observer.finished(outcome, prompt_tokens, completion_tokens, time.perf_counter() - job.submitted)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _report(self) -> None:
        self.observer.queue_length(self.queue_length)
        self.observer.batch_rows(self.running)


class SerialScheduler(SchedulerBase):
    """One job at a time in arrival order through `Pipeline.generate_prepared` (any decoder, the standard
    variant's concat cache too): the same Job, Observer and queue bound as BatchScheduler, one row."""

    max_batch = 1

    def __init__(self, pipe, max_queue: int = DEFAULT_MAX_QUEUE, observer: Observer | None = None):
        check_sizes(1, max_queue)
        self.pipe, self.max_queue = pipe, max_queue
        self.observer = observer or Observer()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="edgevl-generate")
        self.jobs: set[Job] = set()
        self.active: Job | None = None
        self.lock = threading.RLock()
        self.closed = False

    @property
    def running(self) -> int:
        return int(self.active is not None)

    def submit(self, job: Job) -> Job:
        self._accept(job)
        self.worker.submit(self._work, job)
        return job

    def _work(self, job: Job) -> None:
        self._run(job)
        trim_heap()     # the request's images and arrays are gone: their pages go back to the system

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.worker.shutdown(wait=False, cancel_futures=True)
        for job in list(self.jobs):
            self._end(job, None, RequestCancelled("the server is shutting down"), "cancelled")

    def _run(self, job: Job) -> None:
        with self.lock:
            self.active = job
            self._report()
        started = False

        def start() -> None:
            nonlocal started
            if job.cancelled:
                raise RequestCancelled
            if not started:     # Pipeline.decode tells text, not tokens: the first text stands for the first token
                started = True
                self.observer.first_token(time.perf_counter() - job.submitted)
                if job.on_start:
                    job.on_start()

        def on_text(_row, delta: str) -> None:
            start()
            if job.on_text:
                job.on_text(delta)

        def on_logprobs(_row, entries: list) -> None:
            start()
            job.on_logprobs(entries)
        try:
            if job.cancelled:
                raise RequestCancelled
            prompt = job.prepare()
            result = self.pipe.generate_prepared([prompt], job.decoding, on_text,
                                                 on_logprobs if job.on_logprobs else None)[0]
        except RequestCancelled as e:
            self._end(job, None, e, "cancelled")
        except BaseException as e:  # noqa: BLE001 - the request's failure, told to its client
            self._end(job, None, e, "failed")
        else:
            for gap in result.timings.decode_s_per_token:
                self.observer.token_gap(gap)
            self.observer.tokens(len(result.token_ids))
            self._end(job, result, None, "completed")

    def _end(self, job: Job, result, error, outcome: str) -> None:
        with self.lock:
            if job not in self.jobs:
                return
            self.jobs.discard(job)
            if self.active is job:
                self.active = None
            self._report()
        self._settle(job, result, error, outcome, len(result.token_ids) if result is not None else 0)


def check_sizes(max_batch: int, max_queue: int) -> None:
    if max_batch < 1:
        raise EdgevlError(f"--max-batch must be at least 1, not {max_batch}.")
    if max_queue < 0:
        raise EdgevlError(f"--max-queue must be at least 0, not {max_queue}.")
