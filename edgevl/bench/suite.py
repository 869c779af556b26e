"""One `edgevl bench` invocation: the sweep, the measurements in order, and the report dict.

Order (one process): every user error first, then the machine description and memory
bandwidth (nothing loaded yet), then every artifact x backend (load once, every workload,
unload), then the transformers reference once per (source model, dtype) for every
workload, reusing the exact prompt texts edgevl ran, then the peers (llama.cpp, OpenVINO:
edgevl.bench.peers, as subprocesses) on the same source model, image and prompt text, and the
bandwidth once more. With --interleave edgevl and transformers are loaded together and their
runs alternate instead. Rows are artifact x backend x image x prompt length x new tokens; each
row carries its reference and peer numbers, ratios and roofline.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgevl.artifact import names
from edgevl.artifact.folder import MANIFEST
from edgevl.bench import compute, stats
from edgevl.bench.machine import current_rss, machine_info, measure_bandwidth
from edgevl.bench.measure import (
    DEFAULT_PROMPT,
    EdgevlEngine,
    SideResult,
    Workload,
    fit_prompt,
    graph_weight_bytes,
    load_engine,
    measure_interleaved,
    measure_workload,
    parse_size,
    probe_contexts,
    side_json,
    synthetic_image,
)
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.options import BackendOptions

SCHEMA = "edgevl-bench/1"


@dataclass
class BenchConfig:
    artifacts: list[Path]
    backends: list[str] = field(default_factory=lambda: ["ort-cpu"])
    options: BackendOptions = field(default_factory=BackendOptions)   # threads, --fast-load, engine limits
    images: list[str] = field(default_factory=list)          # file paths
    image_sizes: list[str] = field(default_factory=list)     # "WxH" or "none"
    prompt: str | None = None
    prompt_tokens: list[int | None] = field(default_factory=lambda: [None])
    new_tokens: list[int] = field(default_factory=lambda: [32])
    runs: int = 5
    warmup: int = 1
    reference: list[str] = field(default_factory=list)      # "hf" and/or peers: "llama.cpp", "openvino"
    reference_model: str | None = None
    decode_contexts: list[int] = field(default_factory=list)
    interleave: bool = False                                 # alternate edgevl and transformers runs
    verify: bool = True
    bandwidth_mib: int = 512
    notes: list[str] = field(default_factory=list)
    presets: dict = field(default_factory=dict)              # artifact path -> preset name
    progress: bool | None = None                             # None: a bar when stderr is a terminal


def check_config(cfg: BenchConfig) -> None:
    if not cfg.artifacts:
        raise EdgevlError("give at least one artifact folder OUT or --preset NAME.")
    if cfg.runs < 1 or cfg.warmup < 0:
        raise EdgevlError("--runs must be at least 1 and --warmup at least 0.")
    if any(n < 2 for n in cfg.new_tokens):
        raise EdgevlError("--new-tokens must be at least 2 (one prefill token, then decode steps).")
    if any(n is not None and n < 1 for n in cfg.prompt_tokens):
        raise EdgevlError("--prompt-tokens must be positive.")
    if any(c < 2 for c in cfg.decode_contexts):
        raise EdgevlError("--decode-contexts must be at least 2.")
    from edgevl.bench.peers import NAMES
    cfg.reference = [cfg.reference] if isinstance(cfg.reference, str) else list(dict.fromkeys(cfg.reference or []))
    if bad := [r for r in cfg.reference if r not in ("hf", *NAMES)]:
        raise EdgevlError(f"--reference takes hf, {', '.join(NAMES)}, not {bad[0]!r}.")
    if cfg.interleave and "hf" not in cfg.reference:
        raise EdgevlError("--interleave alternates edgevl and transformers runs; it needs --reference hf.")
    for path in cfg.images:
        if not Path(path).is_file():
            raise EdgevlError(f"--image {path} does not exist.")


def check_prompt_tokens(cfg: BenchConfig, artifact, context: int) -> None:
    """--prompt-tokens that cannot fit `context` (with a new token) is refused before any prompt text is built."""
    for n in cfg.prompt_tokens:
        if n is not None and n >= context:
            raise EdgevlError(f"--prompt-tokens {n} is more than {artifact.path.name}'s context of {context} tokens holds "
                              f"with a new token; ask for at most {context - 1}.")


def _images(cfg: BenchConfig, folder: Path) -> list[tuple[str | None, Path | None]]:
    out = [(Path(p).name, Path(p)) for p in cfg.images]
    for size in cfg.image_sizes:
        if size.lower() in ("none", "0", "text"):
            out.append((None, None))
        else:
            w, h = parse_size(size)
            out.append((f"{w}x{h}", synthetic_image(w, h, folder)))
    return out or [("448x448", synthetic_image(448, 448, folder))]


def _artifact_info(artifact, cfg: BenchConfig) -> dict:
    m = artifact.manifest
    manifest_bytes = (artifact.path / MANIFEST).read_bytes()
    return {"path": str(artifact.path), "name": artifact.path.name, "preset": cfg.presets.get(str(artifact.path)),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "source_model": m.source.to_json(),
            "dtype": m.dtype, "precision": {**{n: g.precision for n, g in m.graphs.items()},
                                            "embeddings": m.embeddings.precision},
            "quantization": m.quantization.to_json() if m.quantization else None,
            "recipe": m.quantization.recipe if m.quantization else None,
            "on_disk_bytes": sum(f.stat().st_size for f in artifact.path.rglob("*") if f.is_file())}


def _roofline(artifact, weights: dict, side: SideResult, new_tokens: int, bandwidth: float) -> dict:
    cfg = artifact.config
    emb_row = artifact.manifest.embeddings.row_bytes
    kv_dtype = next(t.dtype for t in artifact.manifest.graph(names.DECODER).inputs if names.is_past(t.name))
    itemsize = stats.DTYPE_BITS[kv_dtype] // 8
    context = side.prompt_len + new_tokens / 2   # mean context over the decode steps
    kv = cfg.kv_cache_bytes(1, round(context), itemsize)
    total = stats.decode_bytes_per_token(weights["bytes"], emb_row, kv)
    floor = stats.floor_ms(total, bandwidth)
    return {"weight_bytes": weights["bytes"], "weight_count_method": weights["method"],
            "embedding_row_bytes": emb_row, "kv_bytes_at_mean_context": kv, "mean_context": context,
            "bytes_per_token": total, "bandwidth_bytes_per_s": bandwidth, "floor_ms": floor,
            "weights_only_floor_ms": stats.floor_ms(weights["bytes"] + emb_row, bandwidth),
            "kv_per_token_bytes": cfg.kv_cache_bytes(1, 1, itemsize)}


def _ratios(ours: dict, ref: dict | None) -> dict | None:
    if ref is None:
        return None
    out = {name: stats.ratio((ours["stages"][name] or {}).get("median"), (ref["stages"][name] or {}).get("median"))
           for name in ours["stages"]}
    out["load_s"] = stats.ratio(ours["load_s"], ref["load_s"])
    out["peak_rss_delta"] = None if ours["peak_rss_shared"] else \
        stats.ratio(ours["peak_rss_delta_bytes"], ref["peak_rss_delta_bytes"])
    return out


def _match(ours: SideResult, ref: SideResult | None, same_prompt: bool) -> dict | None:
    if ref is None:
        return None
    prefix = next((i for i, (a, b) in enumerate(zip(ours.tokens, ref.tokens)) if a != b),
                  min(len(ours.tokens), len(ref.tokens)))
    return {"same_prompt_ids": same_prompt, "matching_prefix": prefix, "of": len(ours.tokens)}


class _Progress:
    def __init__(self, total: int, enabled: bool | None):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", disable=False if enabled else None if enabled is None else True,
                            dynamic_ncols=True, leave=False)
        except ImportError:
            self.bar = None
        self.prefix = ""

    def tick(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.prefix} {label}"[-60:], refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Run the whole sweep; returns the report (see report.py for its rendering)."""
    from edgevl.artifact import load_artifact
    from edgevl.runtime.backends.table import get_backend

    check_config(cfg)      # every user error before anything slow
    from edgevl.bench import peers
    found = peers.setups([r for r in cfg.reference if r != "hf"])   # a peer not set up: one sentence, now
    for backend in cfg.backends:
        get_backend(backend)
    artifacts = [load_artifact(p, verify=cfg.verify) for p in cfg.artifacts]
    for artifact, backend in itertools.product(artifacts, cfg.backends):
        check_prompt_tokens(cfg, artifact, get_backend(backend, cfg.options).context_limit(artifact.config))
    for size in cfg.image_sizes:
        if size.lower() not in ("none", "0", "text"):
            parse_size(size)
    sources = {}           # artifact path -> (source model folder, dtype) of its transformers reference
    if cfg.reference:
        from edgevl.bench.reference import reference_dtype, resolve_source
        sources = {str(a.path): (str(resolve_source(a.manifest, cfg.reference_model)), reference_dtype(a.manifest))
                   for a in artifacts}

    started = time.time()
    machine = machine_info()
    log("measuring memory bandwidth")
    bw_start = measure_bandwidth(cfg.bandwidth_mib << 20)
    log("measuring the matrix-multiply rate")
    gemm = compute.measure_gemm(cfg.options.threads)
    with tempfile.TemporaryDirectory(prefix="edgevl-bench-") as tmp:
        workloads = [Workload(label, path, pt, nt) for (label, path), pt, nt in
                     itertools.product(_images(cfg, Path(tmp)), cfg.prompt_tokens, cfg.new_tokens)]
        sides = len(artifacts) * len(cfg.backends) * (2 if cfg.interleave else 1) \
            + (0 if cfg.interleave or "hf" not in cfg.reference else len(set(sources.values())))
        progress = _Progress((cfg.warmup + cfg.runs) * len(workloads) * sides
                             + len(workloads) * peers.runs_per_workload(found, artifacts, cfg), cfg.progress)
        texts: dict = {}   # (source, workload key) -> the prompt text edgevl ran, reused by the reference
        grids = {(str(a.path), w.key): compute.image_grid(w.image_path, a.manifest.image_processor)
                 for a in artifacts for w in workloads if w.image_path is not None}
        probes: list[dict] = []
        try:
            if cfg.interleave:
                results, references = _run_interleaved(cfg, artifacts, workloads, sources, texts, probes, progress)
            else:
                results = _run_edgevl(cfg, artifacts, workloads, sources, texts, probes, progress)
                references = _run_reference(cfg, workloads, sources, texts, probes, progress) \
                    if "hf" in cfg.reference else {}
            peer_sides = peers.run_peers(cfg, found, artifacts, workloads, sources, texts, probes, progress.tick, log)
        finally:
            progress.close()
    gc.collect()
    log("measuring memory bandwidth again")
    bw_end = measure_bandwidth(cfg.bandwidth_mib << 20)
    bandwidth = {"bytes_per_s": max(bw_start["best_bytes_per_s"], bw_end["best_bytes_per_s"]),
                 "start": bw_start, "end": bw_end,
                 "method": "the best of the start and end measurements (" + bw_start["method"] + ")"}

    weights = {str(a.path): graph_weight_bytes(a.graph(names.DECODER)) for a in artifacts}
    rows = [_row(artifact, backend, w, results, references, sources, weights[str(artifact.path)],
                 bandwidth["bytes_per_s"], gemm, grids.get((str(artifact.path), w.key)), cfg, peer_sides)
            for artifact, backend in itertools.product(artifacts, cfg.backends) for w in workloads]
    load = machine.pop("load_average_at_start")
    return {"schema": SCHEMA, "created_unix": started, "duration_s": time.time() - started, "machine": machine,
            "load_average": {"start": load, "end": list(os.getloadavg()) if load else None},
            "bandwidth": bandwidth, "gemm": gemm,
            "settings": {"runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.options.threads,
                         "fast_load": not cfg.options.prepack, "max_context": cfg.options.max_context,
                         "reference": cfg.reference, "decoding": "greedy argmax, EOS ignored",
                         "backends": cfg.backends, "decode_contexts": cfg.decode_contexts,
                         "interleave": cfg.interleave},
            "notes": cfg.notes, "peers": peers.report_info(found), "rows": rows, "context_probes": probes}


def _prompt_text(cfg, engine: EdgevlEngine, source: str, w: Workload, texts: dict) -> str:
    if (source, w.key) not in texts:
        tok = engine.pipe.tokenizer
        texts[(source, w.key)] = fit_prompt(lambda t: engine.count_prompt_tokens(t, w.image_path), tok.encode,
                                            tok.decode, w.prompt_tokens, cfg.prompt or DEFAULT_PROMPT)
    return texts[(source, w.key)]


def _run_edgevl(cfg, artifacts, workloads, sources, texts, probes, progress) -> dict:
    """(artifact, backend, workload key) -> SideResult; each artifact x backend loaded once."""
    results = {}
    for artifact, backend in itertools.product(artifacts, cfg.backends):
        progress.prefix = f"{artifact.path.name}/{backend}"
        gc.collect()
        before = current_rss()
        engine = load_engine(lambda: EdgevlEngine(artifact, backend=backend, options=cfg.options),
                             artifact.path, cfg.warmup, cfg.runs)
        source = sources.get(str(artifact.path), (str(artifact.path),))[0]
        for w in workloads:
            r = measure_workload(engine, _prompt_text(cfg, engine, source, w, texts), w, cfg.runs, cfg.warmup,
                                 progress.tick)
            r.rss_before, r.runners = before, engine.runners
            results[(str(artifact.path), backend, w.key)] = r
        if cfg.decode_contexts:
            probes.append({"artifact": artifact.path.name, "backend": backend, "engine": "edgevl",
                           "points": probe_contexts(engine, cfg.decode_contexts)})
        engine.close()
    return results


def _run_reference(cfg, workloads, sources, texts, probes, progress) -> dict:
    """(source, dtype, workload key) -> SideResult; transformers loaded once per source model and dtype."""
    references = {}
    for source, dtype in dict.fromkeys(sources.values()):
        from edgevl.bench.reference import TransformersEngine
        progress.prefix = f"transformers {dtype}"
        gc.collect()
        before = current_rss()
        engine = load_engine(lambda: TransformersEngine(Path(source), dtype=dtype, threads=cfg.options.threads), source,
                             cfg.warmup, cfg.runs)
        for w in workloads:
            r = measure_workload(engine, texts[(source, w.key)], w, cfg.runs, cfg.warmup, progress.tick)
            r.rss_before = before
            references[(source, dtype, w.key)] = r
        if cfg.decode_contexts:
            probes.append({"artifact": f"source {Path(source).name}", "backend": f"torch-{dtype}",
                           "engine": "transformers", "points": probe_contexts(engine, cfg.decode_contexts)})
        engine.close()
    return references


def _run_interleaved(cfg, artifacts, workloads, sources, texts, probes, progress) -> tuple[dict, dict]:
    """Both engines loaded together, runs alternating; both dicts keyed (artifact, backend, workload key)."""
    from edgevl.bench.reference import TransformersEngine
    results, references = {}, {}
    for source, dtype in dict.fromkeys(sources.values()):
        gc.collect()
        before = current_rss()
        reference = load_engine(lambda: TransformersEngine(Path(source), dtype=dtype, threads=cfg.options.threads), source,
                                cfg.warmup, cfg.runs)
        for artifact, backend in itertools.product(artifacts, cfg.backends):
            if sources[str(artifact.path)] != (source, dtype):
                continue
            progress.prefix = f"{artifact.path.name}/{backend} + transformers"
            engine = load_engine(lambda: EdgevlEngine(artifact, backend=backend, options=cfg.options),
                                 artifact.path, cfg.warmup, cfg.runs)
            for w in workloads:
                pair = measure_interleaved([engine, reference], _prompt_text(cfg, engine, source, w, texts), w,
                                           cfg.runs, cfg.warmup, progress.tick)
                for r in pair:
                    r.rss_before, r.rss_shared = before, True
                pair[0].runners = engine.runners
                results[(str(artifact.path), backend, w.key)], references[(str(artifact.path), backend, w.key)] = pair
            if cfg.decode_contexts:
                probes.append({"artifact": artifact.path.name, "backend": backend, "engine": "edgevl",
                               "points": probe_contexts(engine, cfg.decode_contexts)})
            engine.close()
        if cfg.decode_contexts:
            probes.append({"artifact": f"source {Path(source).name}", "backend": f"torch-{dtype}",
                           "engine": "transformers", "points": probe_contexts(reference, cfg.decode_contexts)})
        reference.close()
    return results, references


def _row(artifact, backend, w: Workload, results, references, sources, weights: dict, bandwidth: float,
         gemm: dict, grid: tuple | None, cfg, peer_sides: dict) -> dict:
    from edgevl.bench.peers import precision, split_failures
    peer_key = (sources.get(str(artifact.path), ("",))[0], precision(artifact.manifest), w.key)
    measured, failed = split_failures(peer_sides.get(peer_key, []))
    ours = results[(str(artifact.path), backend, w.key)]
    ref = references.get((str(artifact.path), backend, w.key)) or \
        (references.get((*sources[str(artifact.path)], w.key)) if sources else None)
    ours_j, ref_j = side_json(ours, w.new_tokens), side_json(ref, w.new_tokens)
    roof = _roofline(artifact, weights, ours, w.new_tokens, bandwidth)
    roof["decode_over_floor"] = stats.ratio(ours_j["stages"]["decode_ms_per_token"]["median"], roof["floor_ms"])
    if ref_j:
        roof["reference_decode_over_floor"] = stats.ratio(ref_j["stages"]["decode_ms_per_token"]["median"],
                                                          roof["floor_ms"])
    return {"artifact": _artifact_info(artifact, cfg), "backend": backend,
            "workload": {"image": w.image_label or "none", "prompt_tokens": ours.prompt_len,
                         "prompt_tokens_target": w.prompt_tokens, "new_tokens": w.new_tokens},
            "edgevl": ours_j, "reference": ref_j, "ratios": _ratios(ours_j, ref_j),
            "peers": [{**p, "ratios": _ratios(ours_j, p)} for p in measured], "peer_failures": failed,
            "tokens_match": _match(ours, ref, ref is not None and ref.prompt_len == ours.prompt_len),
            "roofline": roof, "compute": _compute(artifact, grid, ours, ours_j, ref_j, gemm)}


def _rate_key(manifest, kind: str) -> str:
    """Which measured GEMM rate bounds a graph: int8 for int8 (and int8-compute int4) graphs, else fp32."""
    spec = manifest.graph(kind)
    described = manifest.quantization.graphs.get(manifest.graph_name(spec), "") if manifest.quantization else ""
    return "int8" if spec.precision == "int8" or "int8" in described else "fp32"


def _compute(artifact, grid: tuple | None, ours: SideResult, ours_j: dict, ref_j: dict | None, gemm: dict) -> dict:
    """FLOPs of the vision and prefill stages, the rate each engine reached, and that rate over the
    GEMM rate measured here (for transformers: the fp32 rate; it runs fp32 / the export's dtype)."""
    config = artifact.manifest.config
    flops = {"vision_ms": compute.vision_flops(config, grid) if grid else None,
             "prefill_ms": compute.decoder_flops(config, ours.prompt_len)}
    out = {"grid": list(grid) if grid else None, "vision_flops": flops["vision_ms"],
           "prefill_flops": flops["prefill_ms"]}
    for side, data, keys in (("edgevl", ours_j, {"vision_ms": _rate_key(artifact.manifest, names.VISION),
                                                  "prefill_ms": _rate_key(artifact.manifest, names.DECODER)}),
                             ("reference", ref_j, {"vision_ms": "fp32", "prefill_ms": "fp32"})):
        if data is None:
            continue
        for stage, key in keys.items():
            rate = compute.throughput(flops[stage], (data["stages"][stage] or {}).get("median"))
            name = stage.removesuffix("_ms")
            out[f"{side}_{name}_flops_per_s"] = rate
            out[f"{side}_{name}_gemm_rate"] = key
            out[f"{side}_{name}_of_gemm_rate"] = stats.ratio(rate, gemm.get(f"{key}_flops_per_s"))
    return out

