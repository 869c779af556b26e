"""Rendering a bench report: terminal table, Markdown, JSON and a PNG plot.

The report is the dict `suite.run_bench` returns (schema "edgevl-bench/1"). The
terminal/Markdown output has a header (machine, measured bandwidth, load average,
notes), a summary table with one line per engine per sweep row (medians) plus a
ratio line edgevl / transformers, and a detail table with median / p90 / min of
every stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgevl.bench.stats import median_by_key

STAGE_COLUMNS = (("preprocess_ms", "preproc ms"), ("vision_ms", "vision ms"), ("prefill_ms", "prefill ms"),
                 ("ttft_ms", "TTFT ms"), ("decode_ms_per_token", "decode ms/tok"), ("e2e_ms", "e2e ms"))
MB = 1 << 20
STAGE_COLUMNS_COMPARED = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")


def fmt(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "x":
        return f"{value:.2f}×"
    a = abs(value)
    text = f"{value:.0f}" if a >= 100 else f"{value:.1f}" if a >= 10 else f"{value:.2f}" if a >= 0.01 else f"{value:.2g}"
    return text + unit


def _median(side: dict, stage: str):
    s = side["stages"].get(stage)
    return s["median"] if s else None


def artifact_label(artifact: dict) -> str:
    """'folder (precision)', e.g. 'export-fp32 (fp32)' or 'q8 (int8)'; a preset's name replaces 'export-*'."""
    name = artifact["name"]
    if artifact.get("preset") and name.startswith("export-"):
        name = artifact["preset"]
    return f"{name} ({artifact.get('recipe') or artifact.get('dtype') or '?'})"


def backend_label(row: dict) -> str:
    """The backend edgevl's side ran on, with ", int8 prefill" where its prompts ran on int8 copies of 4-bit weights
    (a w4a16 artifact's measured default on ort-cpu, or --int8-prefill)."""
    return row["backend"] + (", int8 prefill" if "int8-prefill" in row["edgevl"].get("runners", "") else "")


def _config_cells(row: dict) -> list[str]:
    w = row["workload"]
    return [artifact_label(row["artifact"]), backend_label(row), w["image"], str(w["prompt_tokens"]),
            str(w["new_tokens"])]


def _sweep_label(row: dict, with_artifact: bool = True) -> str:
    w = row["workload"]
    what = f"image {w['image']}, {w['prompt_tokens']}+{w['new_tokens']} tok"
    return f"{artifact_label(row['artifact'])} {backend_label(row)}, {what}" if with_artifact else what


def engine_label(side: dict) -> str:
    """'edgevl', 'transformers', or a peer with its variant: 'llama.cpp Q8_0 (+F32 mmproj)'."""
    return f"{side['engine']} {side['variant']}" if side.get("peer") else side["engine"]


def _sides(row: dict) -> list[tuple[str, dict]]:
    """(key, side) for every engine measured in a row: edgevl, transformers, then the peers."""
    return [(k, row[k]) for k in ("edgevl", "reference") if row[k]] + [("peer", p) for p in row.get("peers") or []]


def _ratio_line(row: dict, side: dict, name: str, gpu: bool, tokens: str = "") -> list[str]:
    r = side["ratios"] if name != "hf" else row["ratios"]
    return [""] * 5 + [f"edgevl/{name}", fmt(r["load_s"], "x"), *[fmt(r[s], "x") for s, _ in STAGE_COLUMNS], "",
                       fmt(r["peak_rss_delta"], "x"), *([""] if gpu else []), "", "", tokens]


def _gpu_mb(side: dict):
    gpu = side.get("gpu_memory") or {}
    return None if gpu.get("peak_mb") is None else gpu["peak_mb"] - (gpu.get("before_mb") or 0)


def summary_table(report: dict) -> tuple[list[str], list[list[str]]]:
    gpu = any(_gpu_mb(side) is not None for row in report["rows"] for side in (row["edgevl"], row["reference"])
              if side)
    headers = ["artifact", "backend", "image", "prompt", "new", "engine", "load s",
               *[label for _, label in STAGE_COLUMNS], "tok/s", "peak RSS MB", "floor ms/tok", "×floor", "tokens"]
    if gpu:
        headers.insert(-3, "peak GPU MB")
    lines = []
    for row in report["rows"]:
        roof = row["roofline"]
        for i, (key, side) in enumerate(_sides(row)):
            over = {"edgevl": roof["decode_over_floor"], "reference": roof.get("reference_decode_over_floor")}.get(key)
            cells = _config_cells(row) if i == 0 else [""] * 5
            lines.append(cells + [engine_label(side), fmt(side["load_s"]),
                                  *[fmt(_median(side, s)) for s, _ in STAGE_COLUMNS], fmt(side["tokens_per_s"]),
                                  fmt(side["peak_rss_delta_bytes"] / MB) + (" (both)" if side["peak_rss_shared"] else ""),
                                  *([fmt(_gpu_mb(side))] if gpu else []),
                                  fmt(roof["floor_ms"]) if key == "edgevl" else "", fmt(over, "x"), ""])
            if key == "reference" and row["ratios"]:
                m = row["tokens_match"]
                lines.append(_ratio_line(row, side, "hf", gpu, f"{m['matching_prefix']}/{m['of']} same" +
                                         ("" if m["same_prompt_ids"] else ", prompts differ")))
            elif key == "peer":
                same = side["prompt_tokens"] == row["edgevl"]["prompt_tokens"]
                lines.append(_ratio_line(row, side, side["peer"], gpu,
                                         "" if same else f"prompt {side['prompt_tokens']} tokens"))
    return headers, lines


def detail_table(report: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["artifact", "backend", "image", "prompt", "new", "engine", "load s",
               *[label for _, label in STAGE_COLUMNS], "threads", "others' cores"]
    lines = []
    for row in report["rows"]:
        for i, (_, side) in enumerate(_sides(row)):
            cells = []
            for stage, _ in STAGE_COLUMNS:
                s = side["stages"].get(stage)
                cells.append("—" if not s else f"{fmt(s['median'])} / {fmt(s['p90'])} / {fmt(s['min'])}")
            load = side.get("load")
            load_cell = f"{fmt(load['median'])} / {fmt(load['p90'])} / {fmt(load['min'])}" if load else "—"
            lines.append((_config_cells(row) if i == 0 else [""] * 5) + [
                engine_label(side), load_cell, *cells, str(side["threads"] or "default"),
                fmt(side["other_processes_cores"])])
    return headers, lines


def compute_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Vision and prefill against the matrix-multiply rate measured in the same run: how close each
    compute-bound stage is to what this machine's GEMM kernels can do."""
    headers = ["artifact", "backend", "image", "prompt", "new", "engine", "vision GFLOP", "vision GFLOP/s",
               "of GEMM rate", "prefill GFLOP", "prefill GFLOP/s", "of GEMM rate"]
    lines = []
    for row in report["rows"]:
        c = row.get("compute")
        if not c:
            continue
        for i, key in enumerate(("edgevl", "reference")):
            if row[key] is None:
                continue
            cells = []
            for stage in ("vision", "prefill"):
                rate, of = c.get(f"{key}_{stage}_flops_per_s"), c.get(f"{key}_{stage}_of_gemm_rate")
                cells += [fmt(c[f"{stage}_flops"] / 1e9) if c.get(f"{stage}_flops") and i == 0 else "",
                          fmt(rate / 1e9) if rate else "—",
                          f"{of * 100:.0f} % {c[f'{key}_{stage}_gemm_rate']}" if of else "—"]
            lines.append((_config_cells(row) if i == 0 else [""] * 5) + [row[key]["engine"], *cells])
    return headers, lines


def _bytes(n) -> str:
    return "—" if not n else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _probe_at(report: dict, row: dict, key: str, side: dict) -> tuple[int, float] | None:
    """The decode ms/token a context probe measured for this engine at the longest context probed."""
    for probe in report.get("context_probes") or []:
        if probe["engine"] != side["engine"]:
            continue
        if key == "edgevl" and (probe["artifact"], probe["backend"]) != (row["artifact"]["name"], row["backend"]):
            continue
        if key == "peer" and probe["backend"] != side["variant"]:
            continue
        points = median_by_key(probe["points"])
        return points[-1] if points else None
    return None


def comparison_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Every engine of every row side by side (medians): the table a reader compares engines with."""
    contexts = sorted({c for probe in report.get("context_probes") or [] for c, _ in probe["points"]})
    headers = ["workload", "engine, precision", "load s", "vision ms", "prefill ms", "TTFT ms", "decode ms/tok",
               *([f"decode at {contexts[-1]}"] if contexts else []), "on disk"]
    lines = []
    for row in report["rows"]:
        for i, (key, side) in enumerate(_sides(row)):
            ref_dtype = "fp32" if row["artifact"].get("recipe") else row["artifact"].get("dtype")
            name = {"edgevl": f"edgevl {artifact_label(row['artifact'])} {backend_label(row)}",
                    "reference": f"transformers {ref_dtype}"}.get(key, engine_label(side))
            at = _probe_at(report, row, key, side)
            disk = row["artifact"].get("on_disk_bytes") if key == "edgevl" else side.get("on_disk_bytes")
            lines.append([_sweep_label(row, with_artifact=False) if i == 0 else "", name, fmt(side["load_s"]),
                          *[fmt(_median(side, s)) for s in STAGE_COLUMNS_COMPARED],
                          *([fmt(at[1]) if at and at[0] == contexts[-1] else "—"] if contexts else []), _bytes(disk)])
        for failed in row.get("peer_failures") or []:      # a peer that did not run keeps its row, marked
            lines.append(["", engine_label(failed), "failed", *["—"] * (len(headers) - 3)])
    return headers, lines


def peer_lines(report: dict) -> list[str]:
    """Each peer configuration once: the settings it ran with, or why it did not run."""
    seen, lines = set(), []
    for row in report["rows"]:
        for side in [*(row.get("peers") or []), *(row.get("peer_failures") or [])]:
            label = engine_label(side)
            if label in seen:
                continue
            seen.add(label)
            settings = "; ".join(f"{k} {v}" for k, v in (side.get("settings") or {}).items()) or "its defaults"
            status = f"FAILED: {side['failed']} (tried with {settings})" if "failed" in side else f"ran with {settings}"
            lines.append(f"{label}: {status}")
    return lines


def render_table(headers: list[str], lines: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(out + ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    left = {0, 1, 2, 5, len(headers) - 1}

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt_line(headers), "  ".join("-" * w for w in widths), *map(fmt_line, lines)]).rstrip()


def _streams(b: dict) -> str:
    """The multi-stream read figure, when the report has one (reports of older edgevls do not)."""
    return f" {b['read_streams_bytes_per_s'] / 1e9:.1f} (as streams)" if "read_streams_bytes_per_s" in b else ""


def header_lines(report: dict) -> list[str]:
    m, bw, s = report["machine"], report["bandwidth"], report["settings"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    ram = f"{m['ram_bytes'] / (1 << 30):.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    v = m["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("edgevl", "onnxruntime", "numpy", "torch", "transformers") if k in v)
    load = report.get("load_average") or {}
    lines = [f"machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {ram}, {gpus}; {versions}",
             "memory bandwidth (measured here, start / end of the run): " + " / ".join(
                 f"read {b['read_1thread_bytes_per_s'] / 1e9:.1f} (1 thread) {b['read_all_threads_bytes_per_s'] / 1e9:.1f}"
                 f" ({b['threads']} threads)" + _streams(b) + f", copy {b['copy_bytes_per_s'] / 1e9:.1f}"
                 for b in (bw["start"], bw["end"]))
             + f" GB/s; the roofline uses the best, {bw['bytes_per_s'] / 1e9:.1f} GB/s — {bw['start']['method']}",
             f"runs: {s['runs']} measured after {s['warmup']} warm-up"
             + ("; edgevl and transformers runs interleaved" if s.get("interleave") else "")
             + ("; edgevl with --fast-load (no weight pre-packing)" if s.get("fast_load") else "")
             + f"; decoding: {s['decoding']}"]
    if load.get("start"):
        lines.append(f"load average (1 min) at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f} (this run's "
                     f"own processes included) on {m['logical_cores']} cores"
                     + (" — other processes were running, numbers are noisy" if load["start"][0] > 0.25 else ""))
    others = [side["other_processes_cores"] for row in report["rows"] for _, side in _sides(row)
              if side["other_processes_cores"] is not None]
    if others and max(others) > 0.2:
        lines.append(f"warning: other processes kept up to {max(others):.2f} of {m['logical_cores']} cores busy "
                     f"during the runs (column others' cores); multi-threaded numbers, torch's above all, suffer "
                     f"most — rerun on a quiet machine or compare with --threads 1")
    gemm = report.get("gemm") or {}
    if gemm.get("fp32_flops_per_s"):
        lines.append(f"matrix-multiply rate (measured here): fp32 {gemm['fp32_flops_per_s'] / 1e9:.0f}, int8 "
                     f"{gemm['int8_flops_per_s'] / 1e9:.0f} GFLOP/s — {gemm['method']}")
    for name, info in (report.get("peers") or {}).items():
        v = info.get("versions") or {}
        lines.append(f"peer {name}: " + ", ".join(f"{k} {val}" for k, val in v.items())
                     + (f"; {info['build']}" if info.get("build") else "") + f" (own environment under {info['root']})")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines


FOOTNOTES = [
    "load s: creating the engine (sessions or model, tokenizer, processor), median of as many loads as runs after "
    "as many discarded warm-up loads as warm-up runs, each with the engine's files read into the page cache just "
    "before: a cold first load (disk, a process's first memory) is slower for both engines.",
    "stage times are medians over the measured runs (decode: over every decode step of every run); "
    "TTFT = preprocess + vision + prefill; e2e = TTFT + all decode steps; tok/s = 1000 / decode ms/tok.",
    "peak RSS MB: peak resident memory during the runs minus resident memory before that engine's model was loaded "
    "('(both)': --interleave, both models together); peak GPU MB (with an NVIDIA GPU): peak memory in use on GPU 0 "
    "during the runs minus before them, all processes, sampled by nvidia-smi every 50 ms.",
    "floor ms/tok: bytes one decode step must read (decoder weights incl. external data + one embedding row + "
    "the KV cache at the mean context) / the measured read bandwidth; ×floor = decode ms/tok / floor.",
    "vision / prefill GFLOP: multiply-adds x 2 of every matrix product (edgevl.bench.compute); GFLOP/s = that / "
    "the stage's median; of GEMM rate = GFLOP/s / the matrix-multiply rate measured here for the graph's compute "
    "type (int8 or fp32): near 100 % the stage is compute-bound on these kernels.",
    "threads: intra-op threads (default: onnxruntime one per physical core, torch its own default); others' cores: "
    "cores that other processes kept busy during the runs, on average (/proc/stat).",
    "edgevl/hf: edgevl time / transformers time (below 1× = edgevl faster); tokens: greedy tokens equal to "
    "transformers' (a leading run of N of M).",
    "peers (--reference llama.cpp / openvino) run the same source model, image, prompt text and new-token count "
    "through their own tools as subprocesses, at the precision matching the artifact; edgevl/PEER = edgevl time / "
    "peer time. A stage a peer does not time separately is — (neither peer times image preprocessing, so their "
    "TTFT starts after the image file is read). OpenVINO: vision = VLMPerfMetrics' embeddings preparation (its "
    "image preprocessing included), prefill = the rest of its TTFT, every run without its prefix cache. llama.cpp: one "
    "llama-mtmd-cli process per run, its own log's timings (decode: the run's mean per token); load: the tool's "
    "model + mmproj loading; peak RSS: the whole peer process (llama.cpp: its VmHWM, polled).",
]


def render_text(report: dict, markdown: bool = False) -> str:
    parts = []
    if markdown:
        parts.append("# edgevl bench\n")
        parts += [f"- {line}" for line in header_lines(report)]
    else:
        parts += header_lines(report)
    if any(row.get("peers") or row.get("peer_failures") for row in report["rows"]):
        parts += ["", "## engines side by side (medians)" if markdown else "engines side by side (medians)", "",
                  render_table(*comparison_table(report), markdown=markdown), "",
                  "## peer settings" if markdown else "peer settings", "",
                  *[f"- {line}" if markdown else f"* {line}" for line in peer_lines(report)]]
    parts += ["", "## summary (medians)" if markdown else "summary (medians)",
              "", render_table(*summary_table(report), markdown=markdown), "",
              "## per stage: median / p90 / min (ms; load s)" if markdown else "per stage: median / p90 / min (ms; load s)",
              "", render_table(*detail_table(report), markdown=markdown), ""]
    compute = compute_table(report)
    if compute[1]:
        parts += ["## compute-bound stages against the measured GEMM rate" if markdown
                  else "compute-bound stages against the measured GEMM rate", "",
                  render_table(*compute, markdown=markdown), ""]
    parts += [f"- {n}" if markdown else f"* {n}" for n in FOOTNOTES]
    probes = report.get("context_probes") or []
    if probes:
        parts += ["", "## decode ms/token at context length (synthetic KV cache)" if markdown
                  else "decode ms/token at context length (synthetic KV cache, median)"]
        contexts = sorted({p[0] for probe in probes for p in median_by_key(probe["points"])})
        headers = ["engine", "artifact", "backend", *[str(c) for c in contexts]]
        lines = []
        for probe in probes:
            pts = dict(median_by_key(probe["points"]))
            lines.append([probe["engine"], probe["artifact"], probe["backend"], *[fmt(pts.get(c)) for c in contexts]])
        parts += ["", render_table(headers, lines, markdown=markdown)]
    return "\n".join(parts) + "\n"


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
