"""`edgevl triton OUT -o REPO`: a Triton Inference Server model repository serving an artifact (serve/triton/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgevl.cli.flags import (
    MAX_MIB,
    MAX_QUEUE,
    add_artifact_flags,
    add_backend_flags,
    backend_options,
    logger,
    real,
    whole,
)
from edgevl.errors import EdgevlError
from edgevl.serve.scheduler.jobs import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK

MAX_INSTANCES = 256


def add_parser(sub) -> None:
    p = sub.add_parser(
        "triton", help="write a Triton Inference Server model repository that serves an export",
        description="Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.py: a Python-backend model that runs the "
                    "edgevl runtime inside Triton (`tritonserver --model-repository REPO`). By default the model is "
                    "decoupled: text streams as responses (gRPC streaming, HTTP generate_stream) and each instance "
                    "batches its concurrent requests continuously; --unary gives one response per request instead "
                    "(HTTP /v2/models/NAME/infer, KServe v2). Requests carry the OpenAI chat `messages` as a JSON "
                    "string (images as base64 data URLs, or as encoded files in the `images` tensor) and optional "
                    "sampling tensors; docs/triton.md lists them. Nothing here needs Triton installed; the "
                    "artifact's sha256s are checked now and again when Triton loads it.",
        epilog="Run it: tritonserver --model-repository REPO (in the NGC container nvcr.io/nvidia/tritonserver:"
               "<version>-py3 with edgevl pip-installed; see docs/triton.md for Jetson, several GPUs and KServe).")
    add_artifact_flags(p)
    p.add_argument("-o", "--output", required=True, metavar="REPO",
                   help="the model repository folder to write (written whole, atomically; see --force)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the Triton model name clients call (default: the artifact folder's name)")
    p.add_argument("--instances", type=whole(1, MAX_INSTANCES), default=1, metavar="N",
                   help="model instances (instance_group count; per GPU for GPU backends): each is a process with "
                        "its own copy of the model (default: 1)")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="GPU backends: comma-separated GPU indices that each get --instances instances (default: "
                        "every GPU Triton sees; --device N is the same as --gpus N)")
    p.add_argument("--copy", action="store_true",
                   help="copy the artifact into REPO/NAME/1/artifact (self-contained; checked against its manifest) "
                        "instead of referencing it by absolute path")
    p.add_argument("--unary", action="store_true",
                   help="not decoupled: one response per request with the whole text (HTTP /infer and KServe v2 "
                        "clients; no streaming, one request at a time per instance)")
    p.add_argument("--python-path", action="append", default=[], metavar="DIR",
                   help="a folder put on the sys.path of Triton's Python backend (which ignores PYTHONPATH): a "
                        "virtual environment's root or a site-packages folder holding edgevl and its runtime; "
                        "repeatable, first wins. Not needed where edgevl is installed into the stub's own Python "
                        "(the NGC container after `pip install edgevl`)")
    p.add_argument("--force", action="store_true", help="replace REPO if it exists")
    limits = p.add_argument_group("request limits")
    limits.add_argument("--max-tokens", type=whole(1), default=256, metavar="N",
                        help="new tokens for a request that sends no max_tokens (default: 256)")
    limits.add_argument("--max-image-pixels", type=whole(1), default=4096 * 4096, metavar="N",
                        help="largest image or video frame accepted, in pixels (default: 16777216 = 4096x4096)")
    limits.add_argument("--max-video-mb", type=real(0, MAX_MIB, above=True), default=24.0, metavar="MB",
                        help="largest video in a data URL, in MiB after base64 decoding (default: 24; video needs "
                             "PyAV in Triton's Python)")
    limits.add_argument("--max-video-frames", type=whole(2), default=768, metavar="N",
                        help="at most N frames sampled (at 2 fps) per video (default: 768)")
    limits.add_argument("--max-queue", type=whole(0, MAX_QUEUE), default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests an instance accepts beyond its --max-batch running ones; more get an "
                             f"UNAVAILABLE error (default: {DEFAULT_MAX_QUEUE})")
    limits.add_argument("--prefill-chunk", type=whole(1), default=DEFAULT_PREFILL_CHUNK, metavar="N",
                        help=f"while other requests decode, a joining prompt is prefilled N tokens per decode step "
                             f"(default: {DEFAULT_PREFILL_CHUNK})")
    add_backend_flags(p, backend_help="execution backend inside Triton (default: ort-cpu); ort-cpu instances are "
                                      "KIND_CPU, ort-cuda / trt / ort-trt instances KIND_GPU. Checked against the "
                                      "artifact's graphs here; whether it is installed is checked when Triton loads "
                                      "the model", max_batch=DEFAULT_MAX_BATCH)
    p.set_defaults(func=run)


def parse_gpus(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise EdgevlError(f"--gpus must be comma-separated GPU indices such as 0,1, not {text!r}.") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise EdgevlError(f"--gpus must list distinct GPU indices >= 0, not {text!r}.")
    return gpus


def resolve_python_path(entries: list[str], log) -> list[str]:
    """--python-path values -> folders for the stub's sys.path: a venv root becomes its site-packages."""
    folders = []
    for entry in entries:
        path = Path(entry).expanduser()
        if (path / "pyvenv.cfg").is_file():
            found = sorted(path.glob("lib/python3*/site-packages"))
            if not found:
                raise EdgevlError(f"--python-path {entry} is a virtual environment without "
                                  f"lib/python3.*/site-packages.")
            folders += [str(f.resolve()) for f in found]
        elif path.is_dir():
            folders.append(str(path.resolve()))
        elif path.is_absolute():
            log(f"note: --python-path {entry} does not exist here; it is written as given (a path on the "
                f"serving machine or in its container)")
            folders.append(str(path))
        else:
            raise EdgevlError(f"--python-path {entry} does not exist; give an existing folder or an absolute path "
                              f"on the serving machine.")
    for folder in folders:
        if os.pathsep in folder:
            raise EdgevlError(f"--python-path {folder} contains {os.pathsep!r}, which separates the folders.")
    return folders


def run(args) -> int:
    from edgevl.runtime.limits import validate_threads
    from edgevl.serve.triton.repository import ModelSpec, check_model_name, instance_kind, write_repository

    log = logger("triton")
    backend = args.backend or "ort-cpu"
    gpu = instance_kind(backend) == "KIND_GPU"
    gpus = parse_gpus(args.gpus) if args.gpus is not None else ()
    if args.device != 0:
        if gpus:
            raise EdgevlError("give either --gpus or --device, not both (--device N is --gpus N).")
        gpus = (args.device,)
    if gpus and not gpu:
        raise EdgevlError(f"backend {backend} runs on the CPU; --gpus and --device need ort-cuda, trt or ort-trt.")
    validate_threads(args.threads, "--threads")
    backend_options(args)           # the shared checks of --max-context, --max-image-patches, ...
    name = check_model_name(args.model_name or Path(args.artifact).resolve().name)
    python_path = resolve_python_path(args.python_path, log)
    parameters = {
        "threads": str(args.threads), "max_batch": str(args.max_batch), "max_queue": str(args.max_queue),
        "prefill_chunk": str(args.prefill_chunk), "precision": args.precision,
        "cuda_graph": "true" if args.cuda_graph else "false", "fast_load": "true" if args.fast_load else "false",
        "default_max_tokens": str(args.max_tokens), "max_image_pixels": str(args.max_image_pixels),
        "max_video_mb": f"{args.max_video_mb:g}", "max_video_frames": str(args.max_video_frames),
    }
    if args.int8_prefill is not None:
        parameters["int8_prefill"] = "true" if args.int8_prefill else "false"
    if args.max_context is not None:
        parameters["max_context"] = str(args.max_context)
    if args.max_image_patches is not None:
        parameters["max_image_patches"] = str(args.max_image_patches)
    if args.engine_cache:
        parameters["engine_cache"] = str(Path(args.engine_cache).expanduser().resolve())
    if python_path:
        parameters["python_path"] = os.pathsep.join(python_path)
    spec = ModelSpec(name, backend, decoupled=not args.unary, instances=args.instances, gpus=gpus,
                     parameters=parameters)
    model_dir = write_repository(args.artifact, args.output, spec, copy=args.copy, verify=not args.no_verify,
                                 force=args.force, log=log)
    repo = model_dir.parent
    where = f"{len(gpus)} listed GPU(s)" if gpus else "every GPU" if gpu else "the CPU"
    print(f"wrote {repo}: model '{name}' ({'decoupled, streaming' if not args.unary else 'one response per request'}"
          f", {backend}, {args.instances} instance(s) on {where})", file=sys.stderr)
    print(f"serve it: tritonserver --model-repository {repo}", file=sys.stderr)
    return 0
