"""`edgevl quantize OUT -o OUT_Q --recipe R`: calibrated fp16 / int8 / 4-bit artifacts, measured and gated."""

from __future__ import annotations

import argparse
import sys

from edgevl.calibrate.options import (
    CALIBRATION_METHODS,
    INT8_ACTIVATIONS,
    RECIPE_NAMES,
    W4_ALGORITHMS,
)
from edgevl.cli.flags import add_backend_flags, backend_from_args, logger, real, whole
from edgevl.extras import requires

RECIPE_HELP = """recipes:
  fp16    Both graphs in fp16: half the size, fast where fp16 math is (GPUs). Layer norms, softmax,
          the edgevl::MRoPE nodes and every node whose calibrated activations come within 8x of the
          fp16 range stay fp32. Default --max-drop 0.01.
  int8    Both graphs: int8 per-channel weights; activations static (QDQ, ranges calibrated with
          --method: what TensorRT needs) and/or dynamic (per call: onnxruntime's fast CPU path), per
          --activations; with auto both are measured and the fastest one within half of --max-drop is
          kept (else the more accurate). Default --max-drop 0.05.
  w4a16   Decoder MatMul weights in 4 bits, blocks of --block-size rows (onnxruntime MatMulNBits,
          --w4-algorithm rtn|hqq|gptq|awq). Activations stay float, or are quantized to int8 per block
          inside the matmul (accuracy_level 4, several times faster on AVX2 CPUs) when that is
          measured to add less than 10% to the decoder's KL; prompts on int8 copies of the 4-bit
          weights (ort-cpu, ~2x faster prefill) are measured the same way, and when kept the manifest
          says int8_prefill, which ort-cpu then follows by default. Vision: int8 when its measured error
          is within half of --max-drop, otherwise fp16. Default --max-drop 0.10.

Sensitive parts (patch embedding, merger, lm_head) start at the recipe's precision. When a graph
drops more than half of --max-drop on calibration samples, they are raised a step at a time
(int4 -> int8 -> fp32), each raise kept only if it removes at least 20% of the graph's measured
error; the report says which and why.

Gate: on held-out samples, the vision graph's mean cosine similarity to fp32 image embeddings and
the decoder's top-1 agreement with fp32 next-token logits must each be within --max-drop of 1.0;
otherwise the command exits with status 2 naming the graph and writes nothing (unless --force).
OUT_Q/quant_report.json holds every measurement; the table is printed to stdout."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize an export folder (fp16, int8 or 4-bit weights), calibrated and measured",
        description="Calibrate on real image + prompt pairs run through the FP32 runtime, quantize the vision and "
                    "decoder graphs with the chosen recipe, measure the result against FP32 on held-out samples "
                    "and write a complete artifact folder the runtime runs unchanged (manifest.json gains a "
                    "`quantization` section; quant_report.json holds the measurements).",
        epilog=RECIPE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="OUT", help="fp32 folder written by `edgevl export`")
    p.add_argument("-o", "--output", required=True, metavar="OUT_Q",
                   help="quantized artifact folder to create; written to a temporary folder and renamed at the end")
    p.add_argument("--recipe", required=True, choices=RECIPE_NAMES,
                   help="what happens to each graph (see 'recipes' below)")
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: a folder of images, or a .jsonl file with one {\"image\": path or "
                        "\"images\": [paths], \"prompt\": text} per line (default: scikit-image's sample "
                        "photographs at varied sizes with varied prompts)")
    p.add_argument("--samples", type=whole(1), default=16, metavar="N",
                   help="calibration samples (default: 16); held-out samples are split off first, seeded")
    p.add_argument("--eval-samples", type=whole(1), default=4, metavar="M",
                   help="held-out samples for the report and the gate (default: 4)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="minmax",
                   help="how static int8 activation ranges are calibrated (default: minmax)")
    p.add_argument("--activations", choices=INT8_ACTIVATIONS, default="auto",
                   help="int8 activations of both graphs: static = QDQ with calibrated ranges (the explicit "
                        "quantization TensorRT builds from; pick it for trt/ort-trt), dynamic = ranges computed per "
                        "call (onnxruntime's fast int8 path on CPUs), auto = build both, keep the faster one whose "
                        "calibration drop is within half of --max-drop, else the more accurate (default)")
    p.add_argument("--max-drop", type=real(0, 1), metavar="X",
                   help="largest allowed drop of a graph's score below fp32's 1.0 (vision: cosine similarity, "
                        "decoder: top-1 agreement); default per recipe: fp16 0.01, int8 0.05, w4a16 0.10")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_Q if it exists, and write it even when a graph fails the gate")
    p.add_argument("--seed", type=whole(0), default=0,
                   help="seed of the built-in samples and of the split (default: 0)")
    p.add_argument("--new-tokens", type=whole(1), default=8, metavar="N",
                   help="greedy tokens generated per held-out sample for agreement and latency (default: 8)")
    p.add_argument("--block-size", type=whole(16), default=128, metavar="B",
                   help="w4a16: weight rows per 4-bit scale, a power of two >= 16 (default: 128; 256 makes a "
                        "CPU prefill ~13%% faster for a coarser quantization: benchmarks/kernel_probe.py blocks)")
    p.add_argument("--w4-algorithm", choices=W4_ALGORITHMS, default="rtn",
                   help="w4a16: round-to-nearest (default), HQQ (needs torch), GPTQ (uses the calibration data; "
                        "refused where onnxruntime's GPTQ gives the same weights as rtn, as in 1.32) or AWQ "
                        "(activation-aware scaling from the calibration data, searched per layer against RTN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_backend_flags(p, backend_help="execution backend for calibration and measurement (default: ort-cpu); "
                                      "the quantized artifact is measured on it as users will run it")
    p.set_defaults(func=run)


def run(args) -> int:
    with requires("quantize", "`edgevl quantize`"):
        from edgevl.calibrate.options import QuantizeOptions
        from edgevl.calibrate.quantize import quantize
    opts = QuantizeOptions(recipe=args.recipe, calib=args.calib, samples=args.samples, eval_samples=args.eval_samples,
                           method=args.method, activations=args.activations, max_drop=args.max_drop, seed=args.seed,
                           new_tokens=args.new_tokens, block_size=args.block_size, w4_algorithm=args.w4_algorithm,
                           force=args.force, progress=not args.no_progress)
    opts.check()
    backend = backend_from_args(args, name=args.backend or "ort-cpu")
    quantize(args.artifact, args.output, opts, backend, log=logger("quantize"), table=print)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
