"""edgevl on a GPU backend vs transformers (bf16, sdpa) in the same process: vision, time to first token,
decode time per token, for one prompt with one square image, and edgevl's greedy tokens against transformers'.
Writes one JSON file naming the card.

    python benchmarks/gpu_bench.py --model MODEL_DIR --artifact FP16_EXPORT [--backend ort-cuda]
        [--cuda-graph off|on|both] [--image-size 448] [--new-tokens 64] [--runs 3] [--out FILE.json]
        [--hf-device cuda] [--skip-hf]

--cuda-graph both (the default) measures edgevl twice, without and with `--cuda-graph` (decode steps replayed as
CUDA graphs; ort-cuda only), as the sides "edgevl" and "edgevl_cuda_graph".
Random-weight models stop whenever they draw an EOS token, so EOS is switched off on both sides
(edgevl: the pipeline's eos list is emptied; transformers: min_new_tokens): every run decodes exactly
--new-tokens tokens. Each stage is measured after one warm-up run; medians over --runs are reported.
Greedy tokens: each edgevl side's first measured run against transformers' (an untimed run with its scores):
how many leading tokens are equal, and at the first difference the gap between transformers' two best logits
(random weights have near-ties, where fp16 and bf16 part ways). A failing side is recorded in the JSON (with its
error) and the other sides still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

PROMPT = "Describe this image in detail."


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_image(size: int) -> Path:
    import numpy as np
    import skimage.data
    from PIL import Image
    path = Path(tempfile.mkdtemp(prefix="edgevl-bench-")) / f"astronaut-{size}.png"
    Image.fromarray(np.asarray(skimage.data.astronaut())).resize((size, size), Image.BICUBIC).save(path)
    return path


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def bench_edgevl(artifact: Path, backend: str, image: Path, new_tokens: int, runs: int,
                 cuda_graph: bool = False) -> dict:
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    t0 = time.perf_counter()
    pipe = Pipeline.load(artifact, backend=backend, verify=False, options=BackendOptions(cuda_graph=cuda_graph))
    load_s = time.perf_counter() - t0
    log(f"edgevl loaded on {pipe.backend.name} in {load_s:.1f} s; warming up")
    pipe.config = dataclasses.replace(pipe.config, eos_token_id=())   # random weights: decode exactly new_tokens
    pipe.generate(PROMPT, images=[image], max_new_tokens=4, do_sample=False)
    row = pipe.prepare(PROMPT, [image])
    vision = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pipe.encode_image(row.pixel_values[0], row.grids[0])
        vision.append(time.perf_counter() - t0)
    ttft, prefill, decode, pre, tokens = [], [], [], [], None
    for i in range(runs):
        r = pipe.generate(PROMPT, images=[image], max_new_tokens=new_tokens, do_sample=False)
        tokens = r.token_ids if tokens is None else tokens
        t = r.timings
        pre.append(t.preprocess_s)
        prefill.append(t.prefill_s)
        ttft.append(t.preprocess_s + t.vision_s + t.prefill_s)
        decode.append(median(t.decode_s_per_token))
        log(f"edgevl run {i + 1}/{runs}: ttft {ttft[-1] * 1e3:.1f} ms, decode {decode[-1] * 1e3:.2f} ms/token, "
            f"{len(r.token_ids)} tokens")
    result = {"backend": pipe.backend.name, "load_s": load_s, "prompt_tokens": len(row.input_ids),
              "image_grid": list(row.grids[0]), "new_tokens": new_tokens,
              "preprocess_ms": median(pre) * 1e3, "vision_ms": median(vision) * 1e3,
              "prefill_ms": median(prefill) * 1e3, "ttft_ms": median(ttft) * 1e3,
              "decode_ms_per_token": median(decode) * 1e3, "dtype": str(pipe.dtype), "cuda_graph": cuda_graph,
              "token_ids": [int(t) for t in tokens]}
    del pipe
    gc.collect()
    return result


def bench_transformers(model_dir: Path, image: Path, new_tokens: int, runs: int, device: str) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from edgevl.bench.reference import processor_inputs

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").to(device).eval()
    load_s = time.perf_counter() - t0
    log(f"transformers loaded (bf16, sdpa, {device}) in {load_s:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)

    def preprocess():
        inputs = processor_inputs(tokenizer, processor, PROMPT, [Image.open(image)])
        return inputs["input_ids"], inputs

    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token: a timestamp each."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(tokens: int) -> tuple[float, list[float]]:
        """(time to first token incl. preprocessing, seconds per decoded token)."""
        t0 = time.perf_counter()
        ids, px = preprocess()
        ids = ids.to(device)
        clock = Clock()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=(ids == model.config.image_token_id).int(),
                           pixel_values=px["pixel_values"].to(device, torch.bfloat16),
                           image_grid_thw=px["image_grid_thw"].to(device), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, streamer=clock)
        sync()
        stamps = clock.times[1:]                      # [0] is the prompt
        return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]

    ids, px = preprocess()
    pixels, grid = px["pixel_values"].to(device, torch.bfloat16), px["image_grid_thw"].to(device)
    run(4)                                           # warm-up (kernels, allocator)
    pre, vision, ttft, decode = [], [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        preprocess()
        pre.append(time.perf_counter() - t0)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            model.model.visual(pixels, grid_thw=grid)
            sync()
            vision.append(time.perf_counter() - t0)
        first, steps = run(new_tokens)
        ttft.append(first)
        decode.append(median(steps))
        log(f"transformers run {i + 1}/{runs}: ttft {ttft[-1] * 1e3:.1f} ms, decode {decode[-1] * 1e3:.2f} ms/token, "
            f"{len(steps) + 1} tokens")
    with torch.no_grad():                            # untimed: the greedy tokens and each step's top-2 gap
        ref = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             mm_token_type_ids=(ids == model.config.image_token_id).int().to(device),
                             pixel_values=pixels, image_grid_thw=grid, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float((top[0, 0] - top[0, 1]).item()) for top in (s.float().topk(2, dim=-1).values for s in ref.scores)]
    result = {"load_s": load_s, "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
              "token_ids": ref.sequences[0, ids.shape[1]:].tolist(), "top2_gaps": gaps,
              "preprocess_ms": median(pre) * 1e3, "vision_ms": median(vision) * 1e3, "ttft_ms": median(ttft) * 1e3,
              "decode_ms_per_token": median(decode) * 1e3,
              "dtype": "bfloat16", "attention": "sdpa", "device": device,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    model = None  # free it before edgevl's run (the closures above are done with it)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def agreement(ours: list[int], ref: list[int], gaps: list[float]) -> dict:
    """Leading greedy tokens equal to transformers', and transformers' top-2 gap where they first differ."""
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return {"equal_leading_tokens": same, "of": len(ref),
            "gap_at_first_difference": gaps[same] if same < min(len(ours), len(ref)) else None}


def card_name() -> str:
    from edgevl.runtime.backends import probe
    gpus = probe.gpus()
    return gpus[0].name if gpus else f"cpu-{platform.machine()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (for transformers)")
    p.add_argument("--artifact", type=Path, required=True, help="edgevl export folder of the same model")
    p.add_argument("--backend", default="ort-cuda", help="edgevl backend (default: ort-cuda)")
    p.add_argument("--cuda-graph", choices=["off", "on", "both"], default="both",
                   help="edgevl without / with --cuda-graph, or both (default)")
    p.add_argument("--image-size", type=int, default=448, help="square image side in pixels (default: 448)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default: 64)")
    p.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up (default: 3)")
    p.add_argument("--hf-device", default="cuda", help="torch device for transformers (default: cuda)")
    p.add_argument("--skip-hf", action="store_true", help="measure edgevl only")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/gpu-<card>-<date>.json)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")

    from edgevl.runtime.backends.doctor import collect
    card = card_name()
    image = make_image(args.image_size)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    report = {"card": card, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": {"artifact": str(args.artifact), "dtype": manifest.get("dtype"),
                        "layers": manifest["config"]["num_hidden_layers"], "hidden": manifest["config"]["hidden_size"],
                        "vision_depth": manifest["config"]["vision_depth"], "weights": "random"},
              "image": f"{args.image_size}x{args.image_size}", "prompt": PROMPT, "environment": collect()}
    log(f"card {card}; image {args.image_size}x{args.image_size}; {args.new_tokens} new tokens; {args.runs} runs")
    graphs = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graph]
    sides = [("edgevl_cuda_graph" if graphed else "edgevl",
              lambda g=graphed: bench_edgevl(args.artifact, args.backend, image, args.new_tokens, args.runs, g))
             for graphed in graphs]
    if not args.skip_hf:
        sides.append(("transformers", lambda: bench_transformers(args.model, image, args.new_tokens, args.runs,
                                                                 args.hf_device)))
    for name, fn in sides:
        try:
            report[name] = fn()
        except Exception as e:   # record and carry on: the other side's numbers are still worth having
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"{name} failed: {type(e).__name__}: {e}")
    ref = report.get("transformers", {})
    for name, _ in sides:
        ours = report.get(name, {})
        if name != "transformers" and "error" not in ours and ref and "error" not in ref:
            report.setdefault("speedup_vs_transformers", {})[name] = {
                k: ref[k] / ours[k] for k in ("vision_ms", "ttft_ms", "decode_ms_per_token") if ours[k]}
            report.setdefault("greedy_tokens_vs_transformers", {})[name] = agreement(
                ours["token_ids"], ref["token_ids"], ref["top2_gaps"])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    out = args.out or Path(__file__).parent / "results" / f"gpu-{slug}-{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    for name, _ in sides:
        r = report.get(name)
        if r and "error" not in r:
            log(f"{name:>17}: vision {r['vision_ms']:.1f} ms, ttft {r['ttft_ms']:.1f} ms, "
                f"decode {r['decode_ms_per_token']:.2f} ms/token")
    for name, ratios in report.get("speedup_vs_transformers", {}).items():
        log(f"{name} speedup vs transformers: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    for name, agree in report.get("greedy_tokens_vs_transformers", {}).items():
        log(f"{name} greedy tokens: {agree['equal_leading_tokens']}/{agree['of']} leading equal to transformers'"
            + (f" (top-2 gap {agree['gap_at_first_difference']:.3g} where they part)"
               if agree["gap_at_first_difference"] is not None else ""))
    return 0 if all("error" not in report.get(n, {}) for n, _ in sides) else 1


if __name__ == "__main__":
    sys.exit(main())
