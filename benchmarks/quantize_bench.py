"""Quantization on the CPU: size, decode latency and agreement of fp32 / int8 / w4a16 artifacts.

    python benchmarks/quantize_bench.py                       # qwen2-vl-2b-l4, ~1 GB, tens of minutes on 2 cores
    python benchmarks/quantize_bench.py --preset tiny --out /tmp/qbench   # smoke run in seconds

Steps, each skipped when its output already exists under --cache:
  model     python -m edgevl.synthetic.random_model DIR --preset P   (random weights, the preset's real widths)
  export    python -m edgevl export DIR -o export-fp32          (the same layout benchmarks/run_cpu.sh uses)
  quantize  edgevl.calibrate.quantize for int8 and w4a16 (force=True: a gate failure is reported, not fatal)
  timing    every artifact through the normal runtime on one 448x448 photograph and one prompt: --runs
            interleaved runs of --new-tokens greedy tokens each (EOS ignored so every run decodes the same
            number of tokens), after one warm-up run each; medians reported
Writes <out>/quantize_cpu.json and .md (default benchmarks/results/). Target: w4a16 decode >= 3x faster
than fp32 with decoder top-1 agreement >= 0.9 (held-out, from the quantize report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPES = ("int8", "w4a16")
TARGET = {"w4a16_decode_speedup": 3.0, "w4a16_top1": 0.9}


def log(msg: str) -> None:
    print(f"[quantize-bench] {msg}", file=sys.stderr, flush=True)


def step(cmd: list[str]) -> float:
    log(" ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def ensure_fp32(preset: str, cache: Path) -> tuple[Path, dict]:
    folder = cache / "presets" / preset
    model, export = folder / "model", folder / "export-fp32"
    took = {}
    if not (model / "config.json").exists():
        took["build_model_s"] = step([sys.executable, "-m", "edgevl.synthetic.random_model", str(model), "--preset", preset])
    if not (export / "manifest.json").exists():
        took["export_s"] = step([sys.executable, "-m", "edgevl", "export", str(model), "-o", str(export), "--force"])
    return export, took


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def photo():
    import skimage.data
    from PIL import Image
    return Image.fromarray(skimage.data.astronaut()).resize((448, 448), Image.BICUBIC)


def time_artifacts(paths: dict[str, Path], new_tokens: int, runs: int, threads: int) -> dict[str, dict]:
    """Median stage timings of `runs` greedy generations of exactly `new_tokens` tokens per artifact.

    Runs are interleaved (run 1 of every artifact, then run 2, ...) so a change in the machine's
    load hits all artifacts alike instead of whichever happened to be timed then.
    """
    from edgevl.runtime.pipeline import Pipeline

    image, prompt = photo(), "Describe this image in detail."
    kw = {"images": [image], "do_sample": False, "repetition_penalty": 1.0}
    pipes = {}
    for name, path in paths.items():
        pipes[name] = Pipeline.load(path, threads=threads)
        pipes[name].config = {**pipes[name].config, "eos_token_id": []}   # never stop early: N tokens every run
        pipes[name].generate(prompt, max_new_tokens=4, **kw)              # warm-up
    results = {name: [] for name in paths}
    for run in range(runs):
        for name, pipe in pipes.items():
            log(f"timing {name}: run {run + 1}/{runs}, {new_tokens} tokens")
            results[name].append(pipe.generate(prompt, max_new_tokens=new_tokens, **kw))
    out = {}
    for name, rs in results.items():
        decode = [1e3 * statistics.mean(r.timings.decode_s_per_token) for r in rs]
        out[name] = {"decode_ms_per_token": statistics.median(decode), "decode_ms_per_token_runs": decode,
                     "prefill_ms": 1e3 * statistics.median(r.timings.prefill_s for r in rs),
                     "vision_ms": 1e3 * statistics.median(r.timings.vision_s for r in rs),
                     "prompt_tokens": len(rs[0].prompt_token_ids), "token_ids": rs[0].token_ids,
                     "load_s": pipes[name].load_s}
    return out


def folder_bytes(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    sizes = {name: (path / name).stat().st_size for name in manifest["files"]}
    graph_bytes = {g: sum(v for k, v in sizes.items() if k.split(".")[0] == Path(spec["file"]).stem)
                   for g, spec in manifest["graphs"].items()}
    return {"total": sum(sizes.values()), **graph_bytes, "embeddings": sizes[manifest["embeddings"]["file"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2-vl-2b-l4")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGEVL_CACHE", Path.home() / ".cache/edgevl")))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--samples", type=int, default=16, help="calibration samples per recipe")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--requantize", nargs="*", choices=RECIPES, metavar="RECIPE",
                   help="quantize these recipes again even if their artifacts exist (no names: all)")
    args = p.parse_args(argv)

    from edgevl.calibrate.quantize import REPORT, quantize

    t_start, load_before = time.perf_counter(), os.getloadavg()
    fp32, took = ensure_fp32(args.preset, args.cache)
    artifacts, reports = {"fp32": fp32}, {}
    for recipe in RECIPES:
        out = fp32.parent / f"quantize-bench-{recipe}"
        again = args.requantize is not None and (not args.requantize or recipe in args.requantize)
        if again or not (out / REPORT).exists():
            log(f"quantize {recipe} -> {out}")
            t0 = time.perf_counter()
            quantize(fp32, out, recipe, samples=args.samples, eval_samples=args.eval_samples, force=True,
                     block_size=args.block_size, new_tokens=16, threads=args.threads, progress=sys.stderr.isatty(),
                     log=log, table=lambda text: print(text, file=sys.stderr))
            took[f"quantize_{recipe}_s"] = time.perf_counter() - t0
        artifacts[recipe], reports[recipe] = out, json.loads((out / REPORT).read_text())
        if "duration_s" in reports[recipe] and f"quantize_{recipe}_s" not in took:   # made by an earlier run
            took[f"quantize_{recipe}_s (earlier run)"] = reports[recipe]["duration_s"]

    timing = time_artifacts(artifacts, args.new_tokens, args.runs, args.threads)
    rows = {}
    for name, path in artifacts.items():
        t, rep = timing[name], reports.get(name)
        row = {"bytes": folder_bytes(path), **{k: v for k, v in t.items() if k != "token_ids"},
               "decode_speedup": timing["fp32"]["decode_ms_per_token"] / t["decode_ms_per_token"],
               "greedy_prefix_agreement_bench": _prefix(timing["fp32"]["token_ids"], t["token_ids"])}
        if rep:
            g = rep["graphs"]
            row.update(precision={k: v["precision_short"] for k, v in g.items()},
                       details={k: v["precision"] for k, v in g.items()},
                       vision_cosine=g["vision"]["metrics"]["cosine_mean"],
                       decoder_top1=g["decoder"]["metrics"]["top1_agreement"],
                       decoder_kl=g["decoder"]["metrics"]["kl_mean"],
                       decoder_top1_confident=g["decoder"]["metrics"].get("top1_agreement_confident"),
                       fp32_margin_median=g["decoder"]["metrics"].get("fp32_margin_median"),
                       greedy_prefix_agreement=rep["pipeline"]["greedy"]["prefix_agreement"], gate_failed=rep["failed"],
                       kept_higher_precision={k: [(x["group"], x["precision"]) for x in v["kept_higher_precision"]]
                                              for k, v in g.items()},
                       decoder_activations=g["decoder"]["details"].get("activations"))
        rows[name] = row
    w4 = rows["w4a16"]
    result = {
        "preset": args.preset, "new_tokens": args.new_tokens, "runs": args.runs, "threads": args.threads,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": _version("onnxruntime"), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "artifacts": rows, "steps_s": {**took, "total_s": time.perf_counter() - t_start},
        "target": {**TARGET, "speed_met": w4["decode_speedup"] >= TARGET["w4a16_decode_speedup"],
                   "top1_met": w4["decoder_top1"] >= TARGET["w4a16_top1"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quantize_cpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _prefix(ref, q) -> float:
    n = next((i for i, (a, b) in enumerate(zip(ref, q)) if a != b), min(len(ref), len(q)))
    return n / len(ref) if ref else 1.0


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# edgevl quantize on the CPU: {r['preset']}", "",
             (f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, threads {r['threads'] or 'default'}; "
             f"load average {m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after "
             f"(a shared machine: latencies carry that noise). {r['runs']} runs x {r['new_tokens']} new tokens, "
             f"one 448x448 image; medians."), "",
             ("| artifact | precision (vision / decoder) | size | decoder file | decode ms/token | speedup | "
             "prefill ms | vision ms | top-1 | KL | vision cos | greedy agreement |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in r["artifacts"].items():
        prec = " / ".join(a["precision"].values()) if "precision" in a else "fp32 / fp32"
        conf = f" ({a['decoder_top1_confident']:.2f})" if a.get("decoder_top1_confident") is not None else ""
        quality = (f"{a['decoder_top1']:.3f}{conf} | {a['decoder_kl']:.4f} | {a['vision_cosine']:.4f} | "
                   f"{a['greedy_prefix_agreement']:.2f}") if "decoder_top1" in a else "1 | 0 | 1 | 1"
        lines.append(f"| {name} | {prec} | {_size(a['bytes']['total'])} | {_size(a['bytes']['decoder'])} | "
                     f"{a['decode_ms_per_token']:.1f} | {a['decode_speedup']:.2f}x | {a['prefill_ms']:.0f} | "
                     f"{a['vision_ms']:.0f} | {quality} |")
    lines += ["", ("top-1 / KL: decoder teacher-forced on held-out samples vs fp32, in brackets top-1 where fp32's "
              "choice is >= 1.5x as likely as its runner-up (random weights make many near-ties); greedy agreement: "
              "matching prefix of 16 greedy tokens (quantize report); sizes include the fp32 embedding table."), ""]
    for name, a in r["artifacts"].items():
        if a.get("details"):
            lines.append(f"- {name}: vision {a['details']['vision']}; decoder {a['details']['decoder']}")
        if a.get("kept_higher_precision"):
            kept = "; ".join(f"{g}: {', '.join(f'{k} at {p}' for k, p in v)}"
                             for g, v in a["kept_higher_precision"].items() if v)
            lines.append(f"- {name}: kept at higher precision: {kept or 'nothing'}"
                         + (f"; decoder activations {a['decoder_activations']}"
                            if a.get("decoder_activations") else ""))
    t, w4 = r["target"], r["artifacts"]["w4a16"]
    lines += ["", (f"Target: w4a16 decode >= {t['w4a16_decode_speedup']}x fp32: "
                   f"{'met' if t['speed_met'] else 'NOT met'} "
              f"({w4['decode_speedup']:.2f}x); top-1 >= {t['w4a16_top1']}: {'met' if t['top1_met'] else 'NOT met'} "
              f"({w4['decoder_top1']:.3f}; fp32's median top-1/top-2 logit margin here is "
              f"{w4.get('fp32_margin_median') or float('nan'):.2f})."), "",
              "Steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["steps_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
