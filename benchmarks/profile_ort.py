"""Where onnxruntime spends a graph's time: per-op-type totals from its built-in profiler.

    python benchmarks/profile_ort.py OUT --graph vision --image-size 448x448
    python benchmarks/profile_ort.py OUT --graph decoder --prompt-tokens 278          # prefill
    python benchmarks/profile_ort.py OUT --graph decoder --decode-context 300         # one decode step

Builds the session like the runtime does (ORT_ENABLE_ALL, CPU provider) with
SessionOptions.enable_profiling, feeds inputs made by edgevl's own stage functions
(a synthetic photo-like image, a filler prompt, a random KV cache), runs --warmup + --runs
times and prints, for the measured runs, the kernel time per op type and the slowest nodes.
Times are onnxruntime's own kernel timings (µs), summed over runs and divided by --runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def make_session(path: Path, threads: int, profile_dir: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def vision_feed(pipe, size: str) -> dict:
    """The vision graph's inputs for one synthetic photo, as the runtime builds them (VisionEncoder.feed: the
    Qwen2.5-VL window layout and Qwen3-VL position-table taps included)."""
    from edgevl.bench.measure import parse_size, synthetic_image
    w, h = parse_size(size)
    with tempfile.TemporaryDirectory(prefix="edgevl-profile-") as tmp:     # the photo is read by prepare
        prepared = pipe.prepare("Describe this image.", [synthetic_image(w, h, Path(tmp))])
    grid, = prepared.grids
    return pipe.vision_encoder.feed(prepared.pixel_values[0], grid)[0]


def decoder_feed(pipe, runner, prompt_tokens: int | None, decode_context: int | None) -> tuple[dict, dict]:
    """(feed, bindings) for one prefill of `prompt_tokens` or one decode step at `decode_context`, with the
    KV cache the graph has (the runtime's own: an in-place buffer bound as past and present, or a concat past)."""
    from edgevl.runtime.kv_cache import make_cache
    cfg, rng = pipe.config, np.random.default_rng(0)
    seq, past = (1, decode_context - 1) if decode_context else (prompt_tokens, 0)
    kind = pipe.artifact.manifest.graph("decoder").kv_cache
    cache = make_cache(kind, runner, cfg, 1, past + seq, pipe.dtype)
    if past:
        cache.fill_random(past, rng)
    feed = {"inputs_embeds": rng.standard_normal((1, seq, cfg.hidden_size), np.float32).astype(pipe.dtype) * 0.02,
            "position_ids": np.broadcast_to(np.arange(past, past + seq), (3, 1, seq)).astype(np.int64).copy(),
            "attention_mask": np.ones((1, past + seq), np.int64), **cache.feed(np.array([seq]), seq)}
    inputs = set(runner.input_metadata())
    levels = len(cfg.vision_deepstack_indexes or ())
    if "deepstack_embeds" in inputs:        # Qwen3-VL: zeros at text positions, what a text-only prompt feeds
        feed["deepstack_embeds"] = np.zeros((levels, 1, seq, cfg.hidden_size), pipe.dtype)
    return {k: v for k, v in feed.items() if k in inputs}, cache.bindings()


def summarize_profile(profile: Path, runs: int, top: int) -> str:
    events = json.loads(profile.read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    by_op, by_node, total = defaultdict(float), defaultdict(float), 0.0
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    measured = model_runs[-runs:]          # the warm-up runs come first
    for e in kernels:
        if not any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in measured):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"] / runs
        by_node[(e["name"].removesuffix("_kernel_time"), op)] += e["dur"] / runs
        total += e["dur"] / runs
    wall = sum(r["dur"] for r in measured) / max(len(measured), 1)
    lines = [f"model_run wall {wall / 1e3:.1f} ms per run, kernels {total / 1e3:.1f} ms per run "
             f"(kernel sum > wall: ops ran in parallel / overlap; < wall: scheduling and copies)", "",
             f"{'op type':<28} {'ms/run':>9} {'share':>7}"]
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        lines.append(f"{op:<28} {us / 1e3:9.2f} {us / total:7.1%}")
    lines += ["", f"slowest {top} nodes:"]
    for (node, op), us in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / 1e3:8.2f} ms  {op:<20} {node}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--graph", choices=["vision", "decoder"], default="vision")
    p.add_argument("--image-size", default="448x448", help="vision: synthetic image size WxH")
    p.add_argument("--prompt-tokens", type=int, default=278, help="decoder prefill length")
    p.add_argument("--decode-context", type=int, help="decoder: profile one decode step at this context")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = onnxruntime's default)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)

    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.backends.ort import OnnxrtRunner
    pipe = Pipeline.load(args.artifact, verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxrtRunner(lambda: make_session(pipe.artifact.graph_path(args.graph), args.threads, Path(tmp)))
        runner.activate()
        feed, bindings = (vision_feed(pipe, args.image_size), {}) if args.graph == "vision" else \
            decoder_feed(pipe, runner, args.prompt_tokens, args.decode_context)
        times = []
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            runner.infer(feed, bindings)        # the cache's lengths are not advanced: every run is the same call
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        profile = Path(runner.session.end_profiling())
        shapes = {k: list(np.shape(v)) for k, v in feed.items() if not k.startswith("past_key_values")}
        print(f"{args.artifact.name} {args.graph} {shapes}; threads {args.threads or 'default'}; "
              f"wall per run (perf_counter, profiling on): {', '.join(f'{t:.1f}' for t in times)} ms")
        print(summarize_profile(profile, args.runs, args.top))


if __name__ == "__main__":
    main()
