"""Vision encoder latency and memory against image size: edgevl vs transformers, every measurement in a fresh
process, all in one run.

    python benchmarks/vision_scaling.py ARTIFACT --sizes 448x448 1344x1008 2016x1512 4032x3024 --json P --markdown P

ARTIFACT is an fp32 export (e.g. the qwen2-vl-2b-l4 preset); transformers runs the source model recorded in
its manifest (fp32, sdpa attention) on the same pixel values (edgevl's preprocessing is transformers').
Per (engine, size), in its own process: load, `--warmup` discarded vision calls, `--runs` timed calls
(median), and the peak resident memory during the vision calls (warm-up included) above the process's
resident memory before the first one ("working memory": activations, the weights excluded) plus the
process's peak (weights included).
An engine that fails (out of memory, killed) is recorded as such and the run goes on. Big images take
minutes per call on a small CPU (attention is quadratic in patches: 4032x3024 is 62k patches);
`--runs-big`/`--warmup-big` apply past `--big-patches`.

`--old-code DIR` adds "edgevl (old graphs)": the same measurement with the edgevl at DIR (a git worktree of an
earlier commit) on ITS export `--old-artifact`, for sizes up to `--old-max-patches` (its naive attention
materializes [heads, N, N] scores and is killed by the kernel past that on 24 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import json, sys, time, numpy as np
from pathlib import Path
engine, artifact, image, runs, warmup, source = sys.argv[1:7]
runs, warmup = int(runs), int(warmup)
from edgevl.bench.machine import PeakRSS, current_rss
out = {}
if engine == "edgevl":
    from edgevl.runtime.pipeline import Pipeline
    pipe = Pipeline.load(artifact, backend="ort-cpu")
    row = pipe.prepare("Describe.", images=[image])
    pv, grid = row.pixel_values[0], row.grids[0]
    run = lambda: pipe.encode_image(pv, grid)
else:
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    torch.set_grad_enabled(False)
    model = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    from PIL import Image
    proc = Qwen2VLImageProcessorPil.from_pretrained(source)
    inputs = proc(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    pv, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    run = lambda: model.model.visual(pv, grid_thw=grid_thw)
    grid = tuple(int(v) for v in grid_thw[0])
out["grid"] = [int(v) for v in grid]
out["patches"] = int(np.prod(grid))
times = []
before = current_rss()
with PeakRSS() as peak:       # warm-up included: allocators that keep their memory grow it there
    for _ in range(warmup):
        run()
    for _ in range(runs):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
out.update(ms=[t * 1e3 for t in times], rss_before=before, working_bytes=peak.peak - before,
           process_peak_bytes=peak.peak)
print("RESULT " + json.dumps(out))
'''


def measure(engine: str, artifact: str, image: Path, runs: int, warmup: int, source: str,
            pythonpath: str | None, timeout: float) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    try:
        # -P: no current folder first on sys.path, so PYTHONPATH's edgevl wins over the checkout this runs in
        proc = subprocess.run([sys.executable, "-P", "-c", CHILD, engine, artifact, str(image), str(runs), str(warmup),
                               source], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}: {tail}"
        return {"error": why, "wall_s": time.perf_counter() - t0}
    result = json.loads(line[len("RESULT "):])
    result["median_ms"] = sorted(result["ms"])[len(result["ms"]) // 2]
    result["wall_s"] = time.perf_counter() - t0
    return result


def patches(size: str, artifact: str) -> int:
    from edgevl.artifact import load_artifact
    from edgevl.runtime.inputs.image_processing import smart_resize
    s = load_artifact(artifact, verify=False).manifest.image_processor
    w, h = (int(v) for v in size.split("x"))
    h2, w2 = smart_resize(h, w, s.factor, s.min_pixels, s.max_pixels)
    return (h2 // s.patch_size) * (w2 // s.patch_size)


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Vision encoder vs image size — {report['artifact_name']}", "",
             f"{m['cpu_model']}, {m['logical_cores']} logical cores, {m['ram_bytes'] / 2**30:.0f} GiB; "
             f"{report['date']}; each cell a fresh process; fp32; working memory = peak RSS during the vision "
             f"calls above the RSS before the first one (weights excluded), process peak in brackets.", "",
             "| image | patches | " + " | ".join(f"{e} ms | {e} working MB" for e in report["engines"]) +
             " | edgevl / transformers ms | edgevl / transformers working memory |",
             "|---|---|" + "---|---|" * len(report["engines"]) + "---|---|"]
    for row in report["rows"]:
        cells = []
        for e in report["engines"]:
            r = row["results"].get(e) or {"error": "not run"}
            if "error" in r:
                cells += [r["error"], ""]
            else:
                cells += [f"{r['median_ms']:.0f}", f"{r['working_bytes'] / 2**20:.0f} ({r['process_peak_bytes'] / 2**30:.1f} GB)"]
        ours, ref = row["results"].get("edgevl", {}), row["results"].get("transformers", {})
        ok = "median_ms" in ours and "median_ms" in ref
        ratio = f"{ours['median_ms'] / ref['median_ms']:.2f}x" if ok else ""
        mem = f"{ours['working_bytes'] / max(ref['working_bytes'], 1):.2f}x" if ok else ""
        lines.append(f"| {row['size']} | {row['patches']} | " + " | ".join(cells) + f" | {ratio} | {mem} |")
    lines += ["", "Runs per cell: " + ", ".join(f"{r['size']}: {r['runs']} after {r['warmup']} warm-up"
                                                for r in report["rows"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--sizes", nargs="+", default=["448x448", "1344x1008", "2016x1512", "4032x3024"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--big-patches", type=int, default=20000)
    p.add_argument("--runs-big", type=int, default=1)
    p.add_argument("--warmup-big", type=int, default=0)
    p.add_argument("--old-code", help="an older edgevl's source folder (its graphs), measured too")
    p.add_argument("--old-artifact", help="that edgevl's export of the same model")
    p.add_argument("--old-max-patches", type=int, default=6000)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)

    from edgevl.artifact import load_artifact
    from edgevl.bench.machine import machine_info
    from edgevl.bench.measure import synthetic_image
    from edgevl.bench.reference import resolve_source
    art = load_artifact(args.artifact, verify=False)
    source = str(resolve_source(art.manifest))
    folder = Path(args.artifact).resolve().parent / "vision-scaling-images"
    folder.mkdir(exist_ok=True)
    engines = ["edgevl", "transformers"] + (["edgevl (old graphs)"] if args.old_code else [])
    rows = []
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        image = synthetic_image(w, h, folder)
        n = patches(size, args.artifact)
        runs, warmup = (args.runs_big, args.warmup_big) if n > args.big_patches else (args.runs, args.warmup)
        row = {"size": size, "patches": n, "runs": runs, "warmup": warmup, "results": {}}
        for engine in engines:
            if engine.startswith("edgevl (old") and n > args.old_max_patches:
                row["results"][engine] = {"error": f"not run: over {args.old_max_patches} patches its "
                                                   f"[heads, N, N] scores exhaust memory"}
                continue
            old = engine.startswith("edgevl (old")
            print(f"[vision] {size} ({n} patches): {engine}", file=sys.stderr, flush=True)
            result = measure("edgevl" if old else engine, args.old_artifact if old else args.artifact, image, runs,
                             warmup, source, args.old_code if old else None, args.timeout)
            print(f"[vision]   {json.dumps({k: v for k, v in result.items() if k != 'ms'})}", file=sys.stderr,
                  flush=True)
            row["results"][engine] = result
        rows.append(row)
    report = {"schema": "edgevl-vision-scaling/1", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine_info(), "artifact": str(args.artifact), "artifact_name": Path(args.artifact).name,
              "source": source, "engines": engines, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    if args.markdown:
        Path(args.markdown).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
