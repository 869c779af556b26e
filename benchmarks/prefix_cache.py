"""What `edgevl serve --prefix-cache` saves a chat client that resends its history (as OpenAI clients do).

    python benchmarks/prefix_cache.py ARTIFACT [--rounds 3] [--image-size 448x448] [--json OUT]

Each round runs, on the server's scheduler (BatchScheduler, as `edgevl serve` makes it, without HTTP), a two-turn
conversation about one synthetic photo: turn 1 asks about the image; turn 2 resends turn 1, the reply and a new
question. Rounds alternate a scheduler with the prefix cache and one without (a fresh scheduler each time, so
nothing carries over), and report turn 2's time to first token, vision calls and cached tokens (medians). The
machine is named in the output; compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def turn(scheduler, prepare, max_new: int):
    from edgevl.serve.scheduler.jobs import Job
    job = scheduler.submit(Job(prepare, scheduler.pipe.decoding(max_new, do_sample=False)))
    scheduler.run_until_idle()
    return job.future.result(timeout=0)


def one_round(pipe, image, prefix_cache: bool, max_new: int) -> dict:
    from edgevl.serve.scheduler.batching import BatchScheduler
    scheduler = BatchScheduler(pipe, max_batch=2, max_queue=2, start=False, prefix_cache=prefix_cache)
    calls, encode = [], pipe.vision_encoder.call
    pipe.vision_encoder.call = lambda pixels, grid: (calls.append(grid), encode(pixels, grid))[1]
    try:
        first = [user("What is in this picture?", 1)]
        reply = turn(scheduler, lambda: pipe.prepare_messages(first, [image]), max_new).text
        second = [*first, {"role": "assistant", "content": [{"type": "text", "text": reply}]},
                  user("Which colours stand out?")]
        before = len(calls)
        t0 = time.perf_counter()
        result = turn(scheduler, lambda: pipe.prepare_messages(second, [image]), max_new)
        return {"ttft_ms": result.timings.ttft_s * 1e3, "wall_ms": (time.perf_counter() - t0) * 1e3,
                "vision_calls": len(calls) - before, "cached_tokens": result.timings.cached_tokens,
                "prompt_tokens": len(result.prompt_token_ids), "tokens": result.token_ids}
    finally:
        pipe.vision_encoder.call = encode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", default="448x448")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from edgevl.bench.machine import machine_info
    from edgevl.bench.measure import parse_size, synthetic_image
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.backends.ort_session import share_thread_pool
    share_thread_pool()
    pipe = Pipeline.load(args.artifact)
    w, h = parse_size(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        image = synthetic_image(w, h, Path(tmp))
        one_round(pipe, image, True, args.new_tokens)                      # warm-up
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            for cache in (True, False):
                runs[cache].append(one_round(pipe, image, cache, args.new_tokens))
    summary = {}
    for cache, label in ((False, "without"), (True, "with")):
        r = runs[cache]
        summary[label] = {k: statistics.median(x[k] for x in r)
                          for k in ("ttft_ms", "wall_ms", "vision_calls", "cached_tokens", "prompt_tokens")}
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs[True], runs[False]))
    info = machine_info()
    machine = (f"{info['cpu_model']}, {info['logical_cores']} logical cores, onnxruntime "
               f"{info['versions'].get('onnxruntime')}")
    print(f"{machine}; {args.artifact.name}, image {args.image_size}, {args.rounds} rounds, "
          f"python {platform.python_version()}")
    print(f"turn 2 ({summary['with']['prompt_tokens']:.0f} prompt tokens), medians:")
    for label, s in summary.items():
        print(f"  {label:>7} prefix cache: TTFT {s['ttft_ms']:.1f} ms, vision calls {s['vision_calls']:.0f}, "
              f"cached tokens {s['cached_tokens']:.0f}")
    print(f"  TTFT ratio with/without: {summary['with']['ttft_ms'] / summary['without']['ttft_ms']:.2f}x; "
          f"greedy tokens {'identical' if same else 'DIFFERENT'} with and without")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "machine": machine,
                                         "summary": summary, "tokens_identical": same}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
