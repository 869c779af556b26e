"""`edgevl export MODEL -o OUT`: a Hugging Face Qwen2-VL checkpoint -> an artifact folder."""

from __future__ import annotations

import sys

from edgevl.cli.flags import whole
from edgevl.extras import requires


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a Qwen2-VL checkpoint to vision + decoder ONNX graphs",
        description="Split a Qwen2-VL checkpoint into vision.onnx and decoder.onnx (KV cache, M-RoPE as the "
                    "edgevl::MRoPE custom op), plus the embedding table, tokenizer, chat template, image-"
                    "processor settings and manifest.json. Needs `pip install edgevl[export]`.")
    p.add_argument("model", metavar="MODEL",
                   help="a local Hugging Face model folder (config.json, *.safetensors, tokenizer.json, "
                        "chat template, preprocessor_config.json) or a hub id such as Qwen/Qwen2-VL-2B-Instruct")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="artifact folder to create; written to a temporary folder and renamed at the end")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="weight and activation precision of both graphs (default: fp32)")
    p.add_argument("--variant", choices=["ort", "standard"], default="ort",
                   help="ort: onnxruntime's fused ops (GroupQueryAttention over an in-place KV cache, "
                        "MultiHeadAttention), for ort-cpu and ort-cuda; standard: ONNX-standard ops only, for "
                        "TensorRT (trt, ort-trt) and other runtimes (default: ort; see docs/graphs.md)")
    p.add_argument("--opset", type=whole(18, 24), default=None, metavar="N",
                   help="ONNX opset of the default domain, 18..24 (default: 18 for ort, 23 for standard; standard "
                        "below 23 spells attention, rotary and RMSNorm in primitive ops, for TensorRT < 10.15)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    p.set_defaults(func=run)


def run(args) -> int:
    with requires("export", "`edgevl export`"):
        from edgevl.export.exporter import export_model
    out = export_model(args.model, args.output, dtype=args.dtype, opset=args.opset, force=args.force,
                       variant=args.variant, log=lambda msg: print(f"[export] {msg}", file=sys.stderr))
    print(f"wrote {out}", file=sys.stderr)
    return 0
