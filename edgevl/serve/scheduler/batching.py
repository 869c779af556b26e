"""Continuous batching: one scheduler thread owns the decoder; requests join the running batch between decode
steps and leave it when they finish.

    submit(job) -> preparing thread -> waiting -> a free row -> vision calls, prefill -> decode steps -> done
                   (video decoding,    (bounded)  (the lowest   (batch-1 calls on     (rows 0..hi-1 in one
                    preprocessing,                 free one)     its row: rows(r,      call: rows(0, hi))
                    tokens)                                      r + 1))

Each step of the loop (`BatchScheduler.step`):
  1. jobs whose client went away leave; their rows are free at once;
  2. free rows go to waiting jobs, oldest first;
  3. one unit of prefill work for the oldest joining row: one vision call (an image, or one temporal patch of a
     video) or one prefill chunk of at most `prefill_chunk` tokens (the whole rest of the prompt when no row is
     decoding), as a batch-1 call on its row: GroupQueryAttention takes S > 1 in a batch only when no row has a
     past, so a joining prompt never rides along with decode rows. The last chunk's logits give its first token;
  4. one decode step for every decoding row: rows 0..hi-1 in one call, hi rounded up to even (ROW_MULTIPLE).
     A row in that range that is free or still prefilling gets the pad token at its current length and keeps
     its length (the position is overwritten when it is really written), so rows never move and nothing is
     copied.

With `prefix_cache` a finished request's row keeps its KV cache (prefix_cache.py): a later request whose prompt
starts the same way (a chat resending its history with the same images) takes that row, skips the vision calls
and the prefill of the shared positions, and reports them as `cached_tokens`. Off by default: the kept
positions were computed by other calls (decode steps, other chunks) than a fresh prefill would make, so
logits can differ in the last bits from the request's own run (int8 artifacts: more, one activation scale per
call), as with the CLI chat's reuse.

Without `prefix_cache` a request's tokens are those it gets alone: its prefill is its own batch-1 calls on its
row, the decoder treats the rows of a batch independently (on onnxruntime's CPU EP a row's logits are
bit-identical at any even batch size and any even chunking, fp32 at any size; the tests and the benchmark check
it), and it samples with its own `SamplingOptions` (its own numpy Generator, seeded per request). Each row's reply
is the generation core's `Sequence` (runtime/generate.py), the one `Pipeline.decode` uses too: choosing, stop
strings, streaming and finish reasons are the same code whichever drives the decoder.

The scheduler needs the in-place decoder (the `ort` variant: one preallocated buffer per layer with rows);
`make_scheduler` falls back to `SerialScheduler` (one request at a time through `Pipeline.generate_prepared`,
arrival order) for the standard variant's concat cache. Both bound the work they hold: at most `max_batch`
running and `max_queue` more accepted (`QueueFull` beyond).

`Job`, `Observer`, `QueueFull`, the defaults and `SerialScheduler` live in jobs.py: what a scheduler takes and
reports, whichever one runs. The server turns the Observer's events into Prometheus metrics (serve/metrics.py);
the runtime itself imports nothing of the server.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.errors import EdgevlError
from edgevl.runtime.generate import decode_one_token, decoder_step
from edgevl.serve.scheduler.jobs import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    Job,
    Observer,
    RequestCancelled,
    SchedulerBase,
    SerialScheduler,
    check_sizes,
)
from edgevl.serve.scheduler.heap import trim_heap
from edgevl.runtime.kv_cache import make_cache
from edgevl.serve.scheduler.slots import Slot, vision_calls
from edgevl.serve.scheduler.prefix_cache import PadTokens, RowPrefixes, cached_vision, prompt_key
from edgevl.runtime.sampling import HostOutputs
from edgevl.runtime.vision import VisionFeatures

# Calls with more than one row run an even number of them (decode steps get a pad row, prefill chunks are even):
# onnxruntime's CPU MatMulNBits (w4a16, 8-bit) computes rows two at a time and an odd last row with its one-row
# kernel, whose logits differ slightly (greedy tokens of the 2b-l4 w4a16 split from a batch-1 run within 2-40
# tokens); rows computed in pairs are bit-identical at any batch size. So a request's tokens do not depend on
# how many others share its steps. (fp32 graphs are bit-identical either way; GPUs are not measured yet.)
ROW_MULTIPLE = 2


# ----------------------------------------------------------------------------- the batch scheduler
class BatchScheduler(SchedulerBase):
    """Continuous batching over the in-place KV cache (see the module docstring).

    start=False: no threads; `submit` prepares at once and the caller runs `step()` (deterministic tests).
    """

    def __init__(self, pipe, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, observer: Observer | None = None, start: bool = True,
                 prefix_cache: bool = False):
        if pipe.decoder_spec.kv_cache != names.IN_PLACE:
            raise EdgevlError("continuous batching needs the in-place decoder of an `--variant ort` export; this "
                              "artifact's decoder grows a concat cache (use the FIFO server for it).")
        check_sizes(max_batch, max_queue)
        if prefill_chunk < 1:
            raise EdgevlError(f"--prefill-chunk must be at least 1, not {prefill_chunk}.")
        self.pipe, self.max_batch, self.max_queue = pipe, max_batch, max_queue
        self.prefill_chunk = _even(prefill_chunk)
        self.observer = observer or Observer()
        # One row more for an odd max_batch > 1: a decode step's pad row (ROW_MULTIPLE); never given to a request.
        rows = max_batch if max_batch == 1 else _even(max_batch, up=True)
        self.cache = make_cache(names.IN_PLACE, pipe.decoder, pipe.config, rows, pipe.max_context, pipe.dtype)
        self.rows: list[Slot | None] = [None] * max_batch
        self.prefixes = RowPrefixes(max_batch) if prefix_cache else None
        self.pads = PadTokens(pipe.config.image_token_id, pipe.config.video_token_id,
                              pipe.image_settings.merge_size, pipe.video_settings.merge_size)
        self.waiting: deque = deque()               # (job, prompt, prefix key or None, guide), prepared, oldest first
        self.jobs: set[Job] = set()                 # accepted and not finished
        self.lock = threading.Condition()
        self.closed = False
        self.pad_id = pipe.pad_id
        self._prepare = self._thread = None
        if start:
            self._prepare = ThreadPoolExecutor(1, thread_name_prefix="edgevl-prepare")
            self._thread = threading.Thread(target=self._loop, name="edgevl-scheduler", daemon=True)
            self._thread.start()

    # -- the client side (any thread)
    def submit(self, job: Job) -> Job:
        """Accept `job` (QueueFull when max_batch + max_queue jobs are already held) and prepare it."""
        self._accept(job)
        if self._prepare is None:
            self._prepare_job(job)
        else:
            self._prepare.submit(self._prepare_job, job)
        return job

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.rows)

    def close(self) -> None:
        """Stop the loop; every job not finished ends with RequestCancelled."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._prepare.shutdown(wait=False, cancel_futures=True)
        for job in list(self.jobs):
            self._end(job, error=RequestCancelled("the server is shutting down"), outcome="cancelled")

    # -- the preparing thread
    def _prepare_job(self, job: Job) -> None:
        if job.cancelled:
            return self._end(job, error=RequestCancelled(), outcome="cancelled")
        try:
            prompt = job.prepare()
            self.pipe.check_context(len(prompt.input_ids))
            key = prompt_key(prompt, self.pads) if self.prefixes else None
            guide = self.pipe.guide(job.decoding.output)   # a grammar compiles here, not on the scheduler thread
        except BaseException as e:  # noqa: BLE001 - the request's own failure, told to its client
            return self._end(job, error=e, outcome="failed")
        with self.lock:
            self.waiting.append((job, prompt, key, guide))
            self.lock.notify_all()

    # -- the scheduler thread
    def _loop(self) -> None:
        while True:
            with self.lock:
                idle = not self.closed and not self.waiting and not self.running
            if idle:
                trim_heap()      # the finished requests' images and arrays: their pages go back to the system
            with self.lock:
                while not self.closed and not self.waiting and not self.running:
                    self.lock.wait()
                if self.closed:
                    return
            self.step()

    def step(self) -> None:
        """One round: leave, join, one unit of prefill work, one decode step (see the module docstring)."""
        self._drop_cancelled()
        self._admit()
        joining = [s for s in self.rows if s is not None and s.next_token is None]
        decoding = [s for s in self.rows if s is not None and s.next_token is not None]
        if joining:
            oldest = min(joining, key=lambda s: s.joined)
            self._guarded([oldest], lambda: self._prefill_work(oldest, chunked=bool(decoding)))
        decoding = [s for s in self.rows if s is not None and s.next_token is not None]
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding))

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until no job is held (start=False)."""
        for _ in range(max_steps):
            if not self.running and not self.waiting:
                return
            self.step()
        raise RuntimeError("the scheduler did not become idle")

    def _drop_cancelled(self) -> None:
        for slot in self.rows:
            if slot is not None and slot.job.cancelled:
                self._release(slot, error=RequestCancelled(), outcome="cancelled")

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and None in self.rows:
                job, prompt, key, guide = self.waiting.popleft()
                if job.cancelled:
                    self._end(job, error=RequestCancelled(), outcome="cancelled")
                    continue
                free = [r for r, s in enumerate(self.rows) if s is None]
                row, keep = self.prefixes.best(free, key) if self.prefixes else (free[0], 0)
                try:
                    self.rows[row] = self._slot(job, prompt, row, keep, key, guide)
                except Exception as e:  # noqa: BLE001 - invalid sampling values: the request's failure
                    self._end(job, error=e, outcome="failed")
            self._report()

    def _slot(self, job: Job, prompt, row: int, keep: int = 0, key: np.ndarray | None = None,
              guide=None) -> Slot:
        """The job on `row`, whose first `keep` positions already hold its prompt's KV (prefix_cache)."""
        length = len(prompt.input_ids)
        max_new = self.pipe.max_new_tokens(job.decoding, length)
        self.cache.lengths[row] = keep
        out = {"image": [[] for _ in prompt.grids], "video": [[] for _ in prompt.video_grids]}
        cached = cached_vision(prompt, keep, self.pads) if keep else {}
        for (kind, index), count in cached.items():     # in the cache already: zeros stand in for rows no call reads
            out[kind][index] = [self._stand_in(count)]
        calls = [c for c in vision_calls(prompt) if (c[0], c[1]) not in cached]
        now = time.perf_counter()
        slot = Slot(job, row, prompt, None, calls, out, key=key, prefilled=keep, joined=now)
        slot.reply = self.pipe.sequence(job.decoding, prompt.input_ids, max_new, self._teller(slot, job.on_text),
                                        self._teller(slot, job.on_logprobs), guide=guide)
        slot.timings.queue_s, slot.timings.cached_tokens = now - job.submitted, keep
        if keep:
            self.observer.cached_tokens(keep)
        return slot

    def _stand_in(self, count: int) -> VisionFeatures:
        """Features for `count` vision rows already in a kept cache: zeros, never read by a call."""
        levels = len(self.pipe.config.vision_deepstack_indexes)
        hidden = self.pipe.config.hidden_size
        return VisionFeatures(np.zeros((count, hidden), np.float32),
                              np.zeros((levels, count, hidden), np.float32) if levels else None)

    def _teller(self, slot: Slot, tell):
        """A reply's on_text / on_logprobs: the job's, after telling it the reply has started."""
        if tell is None:
            return None

        def told(value) -> None:
            self._start(slot)
            tell(value)
        return told

    def _start(self, slot: Slot) -> None:
        """Once per job, when its first token exists: its time to first token, and `on_start`."""
        if slot.started:
            return
        slot.started = True
        slot.timings.ttft_s = time.perf_counter() - slot.job.submitted
        self.observer.first_token(slot.timings.ttft_s)
        if slot.job.on_start:
            slot.job.on_start()

    def _guarded(self, slots: list[Slot], work: Callable[[], None]) -> None:
        """Run `work`; if it raises, the rows it was for end with that error (the others go on)."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - an out-of-memory image, a failed call: those requests fail
            for slot in slots:
                if self.rows[slot.row] is slot:
                    self._release(slot, error=e, outcome="failed")

    def _prefill_work(self, slot: Slot, chunked: bool) -> None:
        """One vision call, or one prefill chunk (the rest of the prompt when not `chunked`), for a joining row."""
        t0 = time.perf_counter()
        if slot.vision:
            kind, index, pixels, grid = slot.vision.pop(0)
            slot.vision_out[kind][index].append(self.pipe.vision_encoder.call(pixels, grid))
            slot.timings.vision_s += time.perf_counter() - t0
            return
        if slot.embeds is None:
            self._prompt_inputs(slot)
        start = slot.prefilled
        stop = min(slot.length, start + self.prefill_chunk) if chunked else slot.length
        outputs = decoder_step(self.pipe.decoder, self.cache.rows(slot.row, slot.row + 1), slot.embeds[None, start:stop],
                               slot.position_ids[:, :, start:stop], np.array([stop - start], np.int64),
                               None if slot.deepstack is None else slot.deepstack[:, None, start:stop])
        slot.prefilled = stop
        slot.timings.prefill_s += time.perf_counter() - t0
        if stop == slot.length:
            self._take(slot, HostOutputs(outputs), 0)
            self.observer.tokens(1)

    def _prompt_inputs(self, slot: Slot) -> None:
        """Embeddings (vision rows scattered in) and M-RoPE positions of the whole prompt, as Pipeline makes them."""
        p = slot.prompt
        images = [VisionFeatures.concat(parts) for parts in slot.vision_out["image"]]
        videos = [VisionFeatures.concat(parts) for parts in slot.vision_out["video"]]
        slot.embeds = self.pipe.embed(p.input_ids, [f.embeds for f in images], [f.embeds for f in videos])
        slot.deepstack = self.pipe.deepstack(p.input_ids, [f.deepstack for f in images], [f.deepstack for f in videos])
        ids = np.asarray(p.input_ids)[None]
        slot.position_ids, slot.rope_deltas = self.pipe.positions(ids, np.ones_like(ids), list(p.grids),
                                                                list(p.video_grids), p.video_seconds)

    def _decode(self, slots: list[Slot]) -> None:
        """One decode step of rows 0..hi-1: each decoding row feeds its chosen token; the others a pad token at
        their current length, which they keep."""
        hi = max(s.row for s in slots) + 1
        hi = min(_even(hi, up=True), self.cache.batch)          # ROW_MULTIPLE; 1 only for a --max-batch 1 server
        view = self.cache.rows(0, hi)
        tokens = np.full(hi, self.pad_id, np.int64)
        deltas = np.zeros((hi, 1), np.int64)
        live = np.zeros(hi, bool)
        for s in slots:
            tokens[s.row], deltas[s.row], live[s.row] = s.next_token, s.rope_deltas[0, 0], True
        t0 = time.perf_counter()
        outputs = decode_one_token(self.pipe.decoder, view, self.pipe.embeddings, tokens, deltas)
        view.lengths[~live] -= 1
        seconds = time.perf_counter() - t0
        self.observer.decode_step(len(slots), seconds)
        host = HostOutputs(outputs)
        for s in slots:
            s.timings.decode_s_per_token.append(seconds)
            self._take(s, host, s.row)
        self.observer.tokens(len(slots))

    def _take(self, slot: Slot, outputs: HostOutputs, index: int) -> None:
        """The row's next token through its reply's step (chosen, streamed); the job ends when the reply does."""
        first = not slot.tokens
        token = slot.reply.step(outputs, index)
        now = time.perf_counter()
        if first:
            self._start(slot)
        else:
            self.observer.token_gap(now - slot.last_token_at)
        slot.last_token_at = now
        if slot.reply.done:
            slot.timings.load_s = self.pipe.load_s
            self._release(slot, result=slot.reply.result(slot.prompt.input_ids, slot.timings), outcome="completed")
        else:
            slot.next_token = token

    def _release(self, slot: Slot, result=None, error: BaseException | None = None, outcome: str = "") -> None:
        """Free the row and end the job. Its positions are overwritten by the next job on the row; with
        prefix_cache a completed job's row keeps its length and remembers what its cache holds."""
        with self.lock:
            if self.rows[slot.row] is slot:
                self.rows[slot.row] = None
                if self.prefixes is not None and error is None:
                    held = int(self.cache.lengths[slot.row])     # prompt + every generated token fed back
                    self.prefixes.remember(slot.row, np.concatenate([slot.key, slot.tokens])[:held])
                else:
                    self.cache.lengths[slot.row] = 0
                    if self.prefixes is not None:
                        self.prefixes.forget(slot.row)
        self._end(slot.job, result, error, outcome, len(slot.tokens))

    def _end(self, job: Job, result=None, error: BaseException | None = None, outcome: str = "",
             completion_tokens: int = 0) -> None:
        with self.lock:
            if job not in self.jobs:
                return
            self.jobs.discard(job)
            self._report()
        self._settle(job, result, error, outcome, completion_tokens)


def _even(n: int, up: bool = False) -> int:
    """n rounded to a multiple of ROW_MULTIPLE (up, or down but at least ROW_MULTIPLE)."""
    if up:
        return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
    return max(ROW_MULTIPLE, n - n % ROW_MULTIPLE)


def make_scheduler(pipe, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, observer: Observer | None = None,
                   prefix_cache: bool = False):
    """BatchScheduler for a pipeline with the in-place decoder; SerialScheduler (FIFO) for anything else."""
    spec = getattr(pipe, "decoder_spec", None)
    if spec is not None and spec.kv_cache == names.IN_PLACE:
        return BatchScheduler(pipe, max_batch, max_queue, prefill_chunk, observer, prefix_cache=prefix_cache)
    if prefix_cache:
        raise EdgevlError("--prefix-cache keeps KV rows of the in-place decoder of an `--variant ort` export; this "
                          "artifact's decoder grows a concat cache.")
    return SerialScheduler(pipe, max_queue, observer)
