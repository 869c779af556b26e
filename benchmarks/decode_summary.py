"""Decode latency against context length, each against its memory floor, from `edgevl bench --decode-contexts`
reports (any edgevl version's: the JSON schema edgevl-bench/1 is shared).

    python benchmarks/decode_summary.py LABEL=report.json [LABEL=report.json ...] --json OUT --markdown OUT

The floor at context C is what one batch-1 decode step must read, over the best memory bandwidth measured
by any of the runs: every decoder weight (the report's roofline.weight_bytes), one embedding row, and the
KV cache at C tokens (2 x layers x kv_heads x head_dim x C x itemsize). Reading the cache is unavoidable;
copying it (a Concat-grown cache) is not, and shows as distance from the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict:
    report = json.loads(Path(path).read_text())
    row = report["rows"][0]
    roof = row["roofline"]
    probes = [p for p in report["context_probes"] if p["engine"] == "edgevl"]
    by_context: dict[int, list[float]] = {}
    for context, ms in (probes[0]["points"] if probes else []):
        by_context.setdefault(int(context), []).append(float(ms))
    return {"report": report, "weight_bytes": roof["weight_bytes"], "embedding_row_bytes": roof["embedding_row_bytes"],
            "kv_per_token_bytes": roof["kv_per_token_bytes"], "bandwidth": report["bandwidth"]["bytes_per_s"],
            "decode_ms": {c: statistics.median(v) for c, v in sorted(by_context.items())},
            "machine": report["machine"], "artifact": row["artifact"]["name"],
            "other_cores": row["edgevl"].get("other_processes_cores")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="LABEL=PATH")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    runs = {}
    for item in args.reports:
        label, _, path = item.partition("=")
        runs[label] = load(Path(path))
    bandwidth = max(r["bandwidth"] for r in runs.values())
    contexts = sorted({c for r in runs.values() for c in r["decode_ms"]})
    rows = []
    for label, r in runs.items():
        for c in contexts:
            ms = r["decode_ms"].get(c)
            floor_bytes = r["weight_bytes"] + r["embedding_row_bytes"] + r["kv_per_token_bytes"] * c
            floor_ms = floor_bytes / bandwidth * 1e3
            rows.append({"engine": label, "artifact": r["artifact"], "context": c, "decode_ms": ms,
                         "floor_ms": floor_ms, "over_floor": ms / floor_ms if ms else None,
                         "floor_bytes": floor_bytes})
    m = next(iter(runs.values()))["machine"]
    lines = ["# Decode vs context, against the memory floor", "",
             f"{m['cpu_model']}, {m['logical_cores']} logical cores; bandwidth {bandwidth / 1e9:.1f} GB/s (best "
             f"measured); batch 1, synthetic KV cache, median of the probe's steps. Floor = (decoder weights + "
             f"an embedding row + the KV cache at that context) / bandwidth.", "",
             "| engine | " + " | ".join(f"{c} ms (x floor)" for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    for label in runs:
        cells = []
        for c in contexts:
            row = next(x for x in rows if x["engine"] == label and x["context"] == c)
            cells.append(f"{row['decode_ms']:.1f} ({row['over_floor']:.2f}x)" if row["decode_ms"] else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Floors (ms): " + "; ".join(
        f"{label} " + ", ".join(f"{c}: {next(x for x in rows if x['engine'] == label and x['context'] == c)['floor_ms']:.1f}"
                                for c in contexts) for label in runs) + ".",
              "Other processes' cores during the runs: " + ", ".join(
                  f"{label} {r['other_cores']:.2f}" for label, r in runs.items() if r["other_cores"] is not None) + "."]
    text = "\n".join(lines) + "\n"
    if args.json:
        Path(args.json).write_text(json.dumps({"schema": "edgevl-decode-contexts/1", "bandwidth_bytes_per_s": bandwidth,
                                               "machine": m, "rows": rows}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
