"""`edgevl doctor [OUT]`: what this machine has and which backends work here (safe without a GPU)."""

from __future__ import annotations

import json

from edgevl.cli.flags import MAX_BATCH, whole


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor", help="report the platform, GPU, driver, CUDA, cuDNN, TensorRT, onnxruntime and usable backends",
        description="Print what this machine has (x86_64 or aarch64, Jetson model, GPU, driver, CUDA, cuDNN, "
                    "TensorRT, onnxruntime and its execution providers) and which edgevl backends will work here, "
                    "with the reason for each one that will not. Safe on machines without a GPU.")
    p.add_argument("artifact", metavar="OUT", nargs="?",
                   help="optional export folder: also print the memory it needs (weights, KV cache)")
    p.add_argument("--max-context", type=whole(1), metavar="N",
                   help="KV-cache size for the memory estimate (default 4096, at most the model's context)")
    p.add_argument("--max-batch", type=whole(1, MAX_BATCH), metavar="N",
                   help="batch size for the memory estimate (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.backends.doctor import collect, format_report
    artifact = None
    if args.artifact:
        from edgevl.artifact import load_artifact
        artifact = load_artifact(args.artifact, verify=False)
    report = collect(artifact, BackendOptions(max_batch=args.max_batch, max_context=args.max_context))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
