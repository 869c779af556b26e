"""`edgevl build OUT --backend trt|ort-trt`: TensorRT engines ahead of time, so `edgevl run` starts at once."""

from __future__ import annotations

import sys
import time

from edgevl.cli.flags import (
    add_artifact_flags,
    add_backend_flags,
    backend_from_args,
    logger,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build", help="build TensorRT engines for an export folder ahead of time",
        description="Build (or find in the engine cache) the engines a backend needs for both graphs, so that "
                    "`edgevl run` starts at once. Engines are cached per GPU model and compute capability, "
                    "TensorRT version, graph (sha256 from the manifest) and build options; a 2B decoder takes "
                    "minutes. ONNX Runtime's CPU and CUDA backends have nothing to build.")
    add_artifact_flags(p, "folder written by `edgevl export` (or `edgevl quantize`)")
    add_backend_flags(p, backend_help="backend to build for: trt or ort-trt (default: the fastest available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgevl.artifact import load_artifact
    artifact = load_artifact(args.artifact, verify=not args.no_verify)
    log = logger("build")
    backend = backend_from_args(args, log)
    log(f"backend {backend.name}: {backend.description}")
    graphs = backend.graphs(artifact)
    for i, graph in enumerate(graphs, 1):
        log(f"({i}/{len(graphs)}) {graph.spec.kind}: {graph.path.name}")
        t0 = time.perf_counter()
        if not backend.build(graph):
            log(f"backend {backend.name} compiles at load time; there is nothing to build ahead.")
            return 0
        log(f"({i}/{len(graphs)}) {graph.spec.kind} ready in {time.perf_counter() - t0:.1f} s")
    print(f"engines for {artifact.path} are in {backend.options.cache}", file=sys.stderr)
    return 0
