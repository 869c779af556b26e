"""Peers for `edgevl bench --reference llama.cpp openvino`: the engines a user would pick instead on a CPU.

A peer is another engine, like the transformers reference, measured on the same source model (the
manifest's), the same image, the same prompt text and the same number of new tokens, at the
precision matching each edgevl artifact (`variants`), and run the way its users run it: its own
tools in its own environment (`make bench-peers`), driven as subprocesses. Nothing of a peer is
imported here; a peer requested but not set up is one sentence naming `make bench-peers`.

Each peer module (llama_cpp, openvino) provides
    setup()                          PeerSetup from ready.json, or the one-sentence EdgevlError
    variants(precision)              the configurations measured for an artifact precision
    measure(setup, source, variant, image, prompt, new_tokens, runs, warmup, threads, tick, log)
                                     -> {"runs": [stage dicts as measure.run_once makes], "load_times",
                                         "peak_rss", "files", "command", "per_step_decode", ...}
    probe(...) (optional)            decode ms/token at context lengths
and this module turns their numbers into rows shaped like the edgevl and transformers sides
(measure.side_json), plus the peer's name, variant, settings, files and their size on disk. Stages a
peer does not time separately are None (neither times image preprocessing; OpenVINO before genai 2026: TTFT
only).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgevl.bench.peers.driver import PeerSetup, files_bytes
from edgevl.errors import EdgevlError

MODULES = {"llama.cpp": "edgevl.bench.peers.llama_cpp", "openvino": "edgevl.bench.peers.openvino"}
NAMES = tuple(MODULES)


def module(name: str):
    return importlib.import_module(MODULES[name])


def setups(names) -> dict[str, PeerSetup]:
    """Every requested peer's setup, or the first one's one-sentence error (before anything slow runs)."""
    return {name: module(name).setup() for name in names}


def precision(manifest) -> str:
    """The artifact's precision as the peers' variant tables name it: a quantize recipe or the export dtype."""
    return manifest.quantization.recipe if manifest.quantization else manifest.dtype


def peer_json(name: str, variant: dict, raw: dict, new_tokens: int, other_cores: float | None) -> dict:
    """A peer's measurements -> the same keys as measure.side_json, plus what identifies the peer."""
    from edgevl.bench import stats
    from edgevl.bench.measure import SideResult, side_json
    loads = [t for t in raw["load_times"] if t is not None]
    side = SideResult(name, stats.summarize(loads)["median"] if loads else None, raw.get("prompt_tokens") or 0,
                      runs=raw["runs"], rss_before=raw.get("rss_before", 0), peak_rss=raw["peak_rss"],
                      threads=raw.get("threads"), other_cores=other_cores, load_times=loads)
    out = side_json(side, new_tokens)
    if not raw.get("per_step_decode"):
        out["decode_by_context"] = []        # one mean per run: no per-step curve to draw
    settings = {**(variant.get("settings") or {}), **(raw.get("settings") or {})}   # what the run really used
    out.update({"peer": name, "variant": variant["label"], "settings": settings,
                "files": raw["files"], "on_disk_bytes": files_bytes(raw["files"]), "command": raw.get("command"),
                "per_step_decode": bool(raw.get("per_step_decode")),
                "exposes": [k for k, v in out["stages"].items() if v is not None]})
    return out


def run_peers(cfg, found: dict[str, PeerSetup], artifacts, workloads, sources: dict, texts: dict, probes: list,
              tick, log) -> dict:
    """Measure every peer variant once per (source model, precision, workload) the artifacts need.
    -> {(source, precision, workload key): [peer_json, ...]}"""
    from edgevl.bench.machine import CpuContention
    if not found:
        return {}
    results: dict = {}
    done = set()
    for artifact in artifacts:
        source, prec = sources[str(artifact.path)][0], precision(artifact.manifest)
        for name, setup in found.items():
            peer = module(name)
            for variant in peer.variants(prec):
                if (source, name, variant["label"]) in done:
                    continue
                done.add((source, name, variant["label"]))
                for w in workloads:
                    if w.image_path is None:      # the peers' tools are driven with one image
                        continue
                    try:
                        with CpuContention() as cpu:
                            raw = peer.measure(setup, Path(source), variant, w.image_path, texts[(source, w.key)],
                                               w.new_tokens, cfg.runs, cfg.warmup, cfg.options.threads, tick, log)
                        side = peer_json(name, variant, raw, w.new_tokens, cpu.other_cores)
                    except PEER_FAILURES as e:
                        log(f"{name} {variant['label']} failed, its row is marked and the comparison goes on: {e}")
                        side = failure_json(name, variant, e)
                    results.setdefault((source, prec, w.key), []).append(side)
                if cfg.decode_contexts and hasattr(peer, "probe"):
                    try:
                        points = peer.probe(setup, Path(source), variant, cfg.decode_contexts, cfg.options.threads, log)
                    except PEER_FAILURES as e:
                        log(f"{name} {variant['label']}: its decode-vs-context probe failed: {e}")
                        points = []
                    probes.append({"artifact": f"source {Path(source).name}", "backend": variant["label"],
                                   "engine": name, "points": points})
    return results


# What a peer's run may fail with (a crashing tool, a conversion the peer's converter refuses, a file it could not
# write): its row is marked with the reason and the rest of the comparison is measured and written.
PEER_FAILURES = (EdgevlError, OSError)


def failure_json(name: str, variant: dict, error: BaseException) -> dict:
    """A peer variant that did not run: what identifies it, the settings it was tried with, and why."""
    return {"engine": name, "peer": name, "variant": variant["label"], "settings": variant.get("settings") or {},
            "failed": str(error) or type(error).__name__}


def split_failures(sides: list[dict]) -> tuple[list[dict], list[dict]]:
    """(peers that were measured, peers that failed)."""
    return [s for s in sides if "failed" not in s], [s for s in sides if "failed" in s]


def runs_per_workload(found: dict[str, PeerSetup], artifacts, cfg) -> int:
    """How many progress ticks the peers add per workload (one per warm-up or measured run of a variant)."""
    variants = {(name, v["label"]) for a in artifacts for name in found
                for v in module(name).variants(precision(a.manifest))}
    return len(variants) * (cfg.warmup + cfg.runs)


def report_info(found: dict[str, PeerSetup]) -> dict:
    return {name: {"versions": setup.versions, "root": str(setup.root), "build": setup.info.get("build")}
            for name, setup in found.items()}
