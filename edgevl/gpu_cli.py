"""`edgevl doctor` and `edgevl build`, plus the backend options `edgevl run` shares with them.

Same shape as edgevl/cli.py: each subcommand is `add_<name>_parser(subparsers)` + `cmd_<name>(args)`;
`edgevl/cli.py` registers them. `add_backend_arguments(parser)` adds --backend, --max-context,
--max-batch, --max-image-patches, --precision, --engine-cache and --device; `backend_options(args)`
turns them into `backends.BackendOptions`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _log(prefix: str):
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared options
def add_backend_arguments(p, backend_help: str | None = None) -> None:
    from edgevl.runtime.backends import BACKENDS
    p.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help=backend_help or "execution backend (default: the fastest available here, see "
                                        "`edgevl doctor`; the choice is printed)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="most tokens per sequence, prompt + generated: the KV-cache size (TensorRT engines are "
                        "built for it; default 4096 for trt/ort-trt, the model's context otherwise)")
    p.add_argument("--max-batch", type=int, metavar="N", help="largest batch the TensorRT engines accept (default 1)")
    p.add_argument("--max-image-patches", type=int, metavar="N",
                   help="most 14x14-pixel patches per image the vision engine accepts (default 4096 = 896x896 "
                        "pixels; a 448x448 image is 1024)")
    p.add_argument("--precision", choices=["graph", "fp16", "int8"], default="graph",
                   help="TensorRT precision: graph = the artifact's own types (strongly typed), fp16 = allow fp16 "
                        "for an fp32 export, int8 = allow int8 (quantized exports); default: graph")
    p.add_argument("--engine-cache", metavar="DIR",
                   help="where engines are cached (default: $EDGEVL_CACHE or ~/.cache/edgevl)")
    p.add_argument("--device", type=int, default=0, metavar="N", help="GPU index (default: 0)")
    p.add_argument("--fast-load", action="store_true",
                   help="ort-cpu: skip onnxruntime's pre-packing of float (fp32/fp16) weights at load: a 2B-width "
                        "fp32 decoder loads in ~0.1 s instead of 2-9 s, vision runs ~10 %% and decode ~5-10 %% "
                        "slower; quantized graphs stay packed. For one-shot runs of float exports, not servers")


def backend_options(args, log=None):
    from edgevl.runtime.backends import BackendOptions
    return BackendOptions(threads=getattr(args, "threads", 0) or 0, prepack=not getattr(args, "fast_load", False),
                          device_id=args.device,
                          max_batch=args.max_batch, max_context=args.max_context,
                          max_image_patches=args.max_image_patches, precision=args.precision,
                          cache_dir=Path(args.engine_cache) if args.engine_cache else None,
                          log=log or _log("backend"))


# ----------------------------------------------------------------------------- doctor
def add_doctor_parser(sub) -> None:
    p = sub.add_parser(
        "doctor", help="report the platform, GPU, driver, CUDA, cuDNN, TensorRT, onnxruntime and usable backends",
        description="Print what this machine has (x86_64 or aarch64, Jetson model, GPU, driver, CUDA, cuDNN, "
                    "TensorRT, onnxruntime and its execution providers) and which edgevl backends will work here, "
                    "with the reason for each one that will not. Safe on machines without a GPU.")
    p.add_argument("artifact", metavar="OUT", nargs="?",
                   help="optional export folder: also print the memory it needs (weights, KV cache)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="KV-cache size for the memory estimate (default 4096, at most the model's context)")
    p.add_argument("--max-batch", type=int, metavar="N", help="batch size for the memory estimate (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    from edgevl.runtime.backends import BackendOptions
    from edgevl.runtime.doctor import collect, format_report
    artifact = None
    if args.artifact:
        from edgevl.runtime.artifact import load_artifact
        artifact = load_artifact(args.artifact, verify=False)
    report = collect(artifact, BackendOptions(max_batch=args.max_batch, max_context=args.max_context))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ----------------------------------------------------------------------------- build
def add_build_parser(sub) -> None:
    p = sub.add_parser(
        "build", help="build TensorRT engines for an export folder ahead of time",
        description="Build (or find in the engine cache) the engines a backend needs for both graphs, so that "
                    "`edgevl run` starts at once. Engines are cached per GPU model and compute capability, "
                    "TensorRT version, artifact (sha256 from its manifest) and build options; a 2B decoder takes "
                    "minutes. ONNX Runtime's CPU and CUDA backends have nothing to build.")
    p.add_argument("artifact", metavar="OUT", help="folder written by `edgevl export`")
    add_backend_arguments(p, backend_help="backend to build for: trt or ort-trt (default: the fastest available)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from edgevl.runtime.artifact import load_artifact
    from edgevl.runtime.backends import get_backend
    artifact = load_artifact(args.artifact, verify=not args.no_verify)
    log = _log("build")
    backend = get_backend(args.backend, backend_options(args, log))
    log(f"backend {backend.name}: {backend.description}")
    for i, graph in enumerate(artifact.manifest["graphs"], 1):
        path = artifact.graph_path(graph)
        log(f"({i}/{len(artifact.manifest['graphs'])}) {graph}: {path.name}")
        t0 = time.perf_counter()
        if not backend.build(path):
            log(f"backend {backend.name} compiles at load time; there is nothing to build ahead.")
            return 0
        log(f"({i}/{len(artifact.manifest['graphs'])}) {graph} ready in {time.perf_counter() - t0:.1f} s")
    print(f"engines for {artifact.path} are in {backend.options.cache}", file=sys.stderr)
    return 0

