"""Measuring one engine on one workload: the stage loop both sides share, and the edgevl engine.

An *engine* exposes the stages of one generation as separate calls,

    prepare(text, image)        image preprocessing + chat template + tokenization   -> prepared
    encode(prepared)            vision encoder                                       -> vision
    prefill(prepared, vision)   embeddings, M-RoPE positions, first decoder forward,
                                greedy pick of the first token                       -> (state, token)
    decode(state, token)        one decoder step with the KV cache + greedy pick     -> token
    synthetic_state(context)    a state whose KV cache holds `context - 1` tokens (for decode-vs-context)

and `measure_workload` times the calls the same way for edgevl (`EdgevlEngine`,
built from the public stage functions of edgevl.runtime) and for transformers
(`reference.TransformersEngine`). Decoding is greedy argmax and ignores EOS, so every
run produces exactly `new_tokens` tokens. Definitions (all wall clock, perf_counter):

    preprocess   prepare()                      ttft   preprocess + vision + prefill
    vision       encode()                       e2e    ttft + all decode steps
    prefill      prefill()                      decode every decode() call of every measured run,
                                                       keyed by the context length it attended to
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edgevl.bench.stats import DTYPE_BITS, median_by_key, summarize, tensor_bytes, tokens_per_second
from edgevl.errors import EdgevlError

DEFAULT_PROMPT = "Describe this image in detail."
FILLER = ("The photograph shows a quiet harbour at dawn: fishing boats rest against the pier, gulls circle "
          "above the masts, and a line of old stone houses with blue shutters climbs the hill behind them. ")
STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")


class Engine(Protocol):
    name: str
    load_s: float

    def prepare(self, text: str, image: Path | None) -> Any: ...
    def prompt_ids(self, prepared) -> list[int]: ...
    def encode(self, prepared) -> Any: ...
    def prefill(self, prepared, vision) -> tuple[Any, int]: ...
    def decode(self, state, token: int) -> int: ...
    def synthetic_state(self, context: int) -> Any: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    image_label: str | None            # "448x448", a file name, or None for a text-only prompt
    image_path: Path | None
    prompt_tokens: int | None          # target total prompt length (template + image + text); None: DEFAULT_PROMPT
    new_tokens: int

    @property
    def key(self) -> tuple:
        return (str(self.image_path), self.prompt_tokens, self.new_tokens)


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EdgevlError(f"--image-size takes WIDTHxHEIGHT such as 448x448, not {text!r}.") from None
    if w < 1 or h < 1 or w * h > 64_000_000:
        raise EdgevlError(f"--image-size {text} is outside 1x1 .. 64 megapixels.")
    return w, h


def synthetic_image(width: int, height: int, folder: Path) -> Path:
    """A deterministic photo-like PNG (smooth gradients, edges and noise) of the given size."""
    from PIL import Image
    path = Path(folder) / f"synthetic-{width}x{height}.png"
    if not path.exists():
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        rng = np.random.default_rng(width * 100_003 + height)
        r = 128 + 100 * np.sin(x / max(width, 1) * 6.3) * np.cos(y / max(height, 1) * 3.1)
        g = 255 * (x + y) / max(width + height, 1)
        b = np.where((x // 37 + y // 53) % 2 == 0, 60.0, 190.0)
        img = np.stack([r, g, b], -1) + rng.normal(0, 12, (height, width, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def fit_prompt(count: Callable[[str], int], encode: Callable[[str], list[int]],
               decode: Callable[[list[int]], str], target: int | None, base: str = DEFAULT_PROMPT) -> str:
    """A prompt text whose full prompt (template + image + text) is `target` tokens by `count`, or as near
    as tokenization allows (within a token or two): `base` followed by filler text, or, when `base` alone
    is too long, its first words."""
    if target is None:
        return base
    words = base.split()
    for n in range(len(words), 0, -1):
        have = count(" ".join(words[:n]))
        if have <= target:
            base = " ".join(words[:n])
            break
    else:
        raise EdgevlError(f"--prompt-tokens {target} is shorter than the {have} tokens the chat template, "
                          f"the image and a one-word prompt already take.")
    filler_ids = encode(FILLER * (target // 8 + 4))
    best, best_err, k = base, abs(have - target), target - have
    for _ in range(12):
        k = max(0, min(k, len(filler_ids)))
        text = base + " " + decode(filler_ids[:k]).strip() if k else base
        err = count(text) - target
        if abs(err) < best_err:
            best, best_err = text, abs(err)
        if err == 0:
            break
        k -= err
    return best


# ----------------------------------------------------------------------------- results
@dataclass
class SideResult:
    """Everything measured for one engine on one workload."""

    engine: str
    load_s: float | None
    prompt_len: int = 0
    runs: list[dict] = field(default_factory=list)            # per measured run: stage -> ms, decode list
    tokens: list[int] = field(default_factory=list)           # generated ids of the last run
    rss_before: int = 0                                       # bytes, before the model was loaded
    peak_rss: int = 0                                         # bytes, peak during the workload's runs
    gpu: dict = field(default_factory=dict)
    threads: int | None = None                                # None: the library's default
    other_cores: float | None = None                          # cores other processes kept busy meanwhile
    rss_shared: bool = False                                  # peak_rss covers every interleaved engine
    load_times: list[float] = field(default_factory=list)     # seconds, each measured load (after warm-up)
    runners: str = ""                                         # edgevl: its runners, e.g. "...decoder+int8-prefill"

    def decode_pairs(self) -> list[tuple[int, float]]:
        return [(self.prompt_len + i + 1, ms) for run in self.runs for i, ms in enumerate(run["decode_ms"])]

    def stages(self) -> dict:
        out = {name: summarize(r[name] for r in self.runs if r.get(name) is not None)
               for name in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "e2e_ms")}
        out["decode_ms_per_token"] = summarize(ms for r in self.runs for ms in r["decode_ms"])
        return {name: out[name] for name in STAGES}

    def decode_by_context(self) -> list[tuple[int, float]]:
        return median_by_key(self.decode_pairs())


def run_once(engine: Engine, text: str, image: Path | None, new_tokens: int) -> tuple[dict, list[int], int]:
    clock = time.perf_counter
    t0 = clock()
    prepared = engine.prepare(text, image)
    t1 = clock()
    vision = engine.encode(prepared) if image is not None else None
    t2 = clock()
    state, token = engine.prefill(prepared, vision)
    t3 = clock()
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        s = clock()
        token = engine.decode(state, token)
        steps.append((clock() - s) * 1e3)
        tokens.append(token)
    t4 = clock()
    timings = {"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": (t2 - t1) * 1e3 if image is not None else None,
               "prefill_ms": (t3 - t2) * 1e3, "ttft_ms": (t3 - t0) * 1e3, "e2e_ms": (t4 - t0) * 1e3,
               "decode_ms": steps}
    return timings, tokens, len(engine.prompt_ids(prepared))


def load_engine(make: Callable[[], Engine], folder, warmup: int, runs: int) -> Engine:
    """Create an engine `warmup` + `runs` times and keep the last; its `load_times` are the measured loads.

    Each load starts with the engine's files in the page cache (machine.warm_page_cache). The
    warm-up loads are discarded like warm-up runs: the first allocation of memory in a process
    (and, on VMs that back guest memory lazily, in the machine) costs seconds that say nothing
    about the engine, and would land on whichever engine is loaded first.
    """
    import gc

    from edgevl.bench.machine import warm_page_cache
    times = []
    for i in range(warmup + runs):
        warm_page_cache(folder)
        engine = make()
        if i >= warmup:
            times.append(engine.load_s)
        if i < warmup + runs - 1:
            engine.close()
            del engine
            gc.collect()
    engine.load_times = times
    return engine


def measure_workload(engine: Engine, text: str, workload: Workload, runs: int, warmup: int,
                     tick: Callable[[str], None] = lambda label: None) -> SideResult:
    """`warmup` discarded runs, then `runs` measured ones; peak RSS and GPU memory over all of them."""
    return measure_interleaved([engine], text, workload, runs, warmup, tick)[0]


def measure_interleaved(engines: list[Engine], text: str, workload: Workload, runs: int, warmup: int,
                        tick: Callable[[str], None] = lambda label: None) -> list[SideResult]:
    """Like measure_workload for several engines at once, their runs alternating (the order rotates every
    run), so that a machine whose load drifts treats them alike. Peak RSS is then the peak of all the
    engines together (each result gets the same value)."""
    from edgevl.bench.machine import CpuContention, GpuMemory, PeakRSS

    loads = [list(getattr(e, "load_times", [e.load_s])) for e in engines]
    results = [SideResult(e.name, summarize(times)["median"], threads=getattr(e, "threads", None), load_times=times)
               for e, times in zip(engines, loads)]
    with PeakRSS() as rss, GpuMemory() as gpu, CpuContention() as cpu:
        for i in range(warmup + runs):
            label = f"warm-up {i + 1}" if i < warmup else f"run {i + 1 - warmup}"
            shift = i % len(engines)
            for k in [*range(shift, len(engines)), *range(shift)]:
                tick(f"{engines[k].name} {label}")
                timings, tokens, prompt_len = run_once(engines[k], text, workload.image_path, workload.new_tokens)
                if i >= warmup:
                    results[k].runs.append(timings)
                    results[k].tokens, results[k].prompt_len = tokens, prompt_len
    for r in results:
        r.peak_rss, r.gpu, r.other_cores = rss.peak, gpu.to_json(), cpu.other_cores
    return results


def probe_contexts(engine: Engine, contexts: list[int], steps: int = 4, warmup: int = 1) -> list[tuple[int, float]]:
    """Decode latency at given context lengths on a synthetic KV cache: (context, ms) for each timed step
    (step i of a context attends to context + i tokens; keyed by the probed context)."""
    pairs = []
    for context in contexts:
        state = engine.synthetic_state(context)
        token = 0
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            token = engine.decode(state, token)
            if i >= warmup:
                pairs.append((context, (time.perf_counter() - t0) * 1e3))
    return pairs


# ----------------------------------------------------------------------------- edgevl
class EdgevlEngine:
    """edgevl's runtime, stage by stage, through Pipeline's public stage methods and edgevl.runtime.generate."""

    name = "edgevl"

    def __init__(self, artifact, backend: str | None = None, options=None):
        """options: runtime.backends.BackendOptions (threads, --fast-load, --max-context, ...)."""
        from edgevl.runtime.pipeline import Pipeline
        t0 = time.perf_counter()
        self.pipe = Pipeline(artifact, backend=backend, options=options)
        self.load_s = time.perf_counter() - t0
        self.config = self.pipe.config
        self.threads = self.pipe.backend.options.threads or None   # 0: onnxruntime's default, one per core
        self.runners = ", ".join(r.name for r in (self.pipe.vision, self.pipe.decoder))    # what ran, as loaded

    def prepare(self, text, image):
        return self.pipe.prepare(text, [image] if image is not None else [])

    def prompt_ids(self, prepared) -> list[int]:
        return prepared.input_ids.tolist()

    def count_prompt_tokens(self, text: str, image: Path | None) -> int:
        return len(self.prepare(text, image).input_ids)

    def encode(self, prepared):
        return self.pipe.encode_vision(prepared)[0]                      # VisionFeatures per image (no videos here)

    def prefill(self, prepared, vision):
        from edgevl.runtime.generate import Prompt, prefill
        ids = prepared.input_ids[None, :]
        vision = vision or []
        embeds = self.pipe.embed(prepared.input_ids, [f.embeds for f in vision])[None]
        levels = self.pipe.deepstack(prepared.input_ids, [f.deepstack for f in vision])
        positions, deltas = self.pipe.positions(ids, np.ones_like(ids), prepared.grids)
        cache = self.pipe.new_cache(1)
        outputs = prefill(self.pipe.decoder, cache, Prompt(embeds, ids, positions, deltas, np.array([ids.shape[1]]),
                                                           None if levels is None else levels[:, None]))
        return {"cache": cache, "deltas": deltas}, self._argmax(outputs)

    def decode(self, state, token):
        from edgevl.runtime.generate import decode_one_token
        outputs = decode_one_token(self.pipe.decoder, state["cache"], self.pipe.embeddings,
                                   np.array([token], np.int64), state["deltas"])
        return self._argmax(outputs)

    @staticmethod
    def _argmax(outputs) -> int:
        from edgevl.runtime.sampling import HostOutputs, SamplingOptions, choose_row
        return choose_row(HostOutputs(outputs), 0, np.zeros(0, np.int64), SamplingOptions())

    def synthetic_state(self, context: int):
        cache = self.pipe.new_cache(1)
        cache.fill_random(context - 1, np.random.default_rng(context))
        return {"cache": cache, "deltas": np.zeros((1, 1), np.int64)}

    def close(self) -> None:
        self.pipe.vision.deactivate()
        self.pipe.decoder.deactivate()
        self.pipe = None


# ----------------------------------------------------------------------------- weights read per decode step
_ONNX_DTYPE_NAMES = {"float": "float32", "double": "float64"}


def graph_weight_bytes(graph) -> dict:
    """Bytes of a GraphFile's initializers (and constant tensors), external data included.

    Uses the onnx package when installed (exact, per-initializer); otherwise the size of
    the graph's files (GraphSpec.files), which over-counts the graph structure (negligible
    next to the weights of a real model)."""
    try:
        import onnx
    except ImportError:
        return {"bytes": sum((graph.path.parent / f).stat().st_size for f in graph.spec.files), "tensors": None,
                "method": "file sizes (onnx not installed)"}
    model = onnx.load(str(graph.path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    total = 0
    for t in tensors:
        external = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and "length" in external:
            total += int(external["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            name = onnx.TensorProto.DataType.Name(t.data_type).lower()
            name = _ONNX_DTYPE_NAMES.get(name, name)
            total += tensor_bytes(t.dims, name) if name in DTYPE_BITS else 0
    return {"bytes": total, "tensors": len(tensors), "method": "onnx initializers + Constant tensors"}


def side_json(side: SideResult | None, new_tokens: int) -> dict | None:
    """One engine's side of a report row: its stage summaries, throughput, memory and runs (None stays None)."""
    if side is None:
        return None
    stages = side.stages()
    decode = (stages["decode_ms_per_token"] or {}).get("median")
    e2e = (stages["e2e_ms"] or {}).get("median")
    return {"engine": side.engine, "load_s": side.load_s, "load": summarize(side.load_times),
            "prompt_tokens": side.prompt_len, "stages": stages,
            "tokens_per_s": tokens_per_second(decode),
            "e2e_tokens_per_s": new_tokens / (e2e / 1e3) if e2e else None,
            "decode_by_context": [list(p) for p in side.decode_by_context()],
            "peak_rss_bytes": side.peak_rss, "rss_before_load_bytes": side.rss_before,
            "peak_rss_delta_bytes": side.peak_rss - side.rss_before, "peak_rss_shared": side.rss_shared,
            "gpu_memory": side.gpu,
            "threads": side.threads, "other_processes_cores": side.other_cores,
            "runners": side.runners,
            "tokens": side.tokens, "runs": side.runs}
