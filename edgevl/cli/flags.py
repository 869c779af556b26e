"""Flag groups shared by the commands, and how they become options objects.

    add_backend_flags(p)   --backend --threads --max-context --max-batch --max-image-patches --precision
                           --engine-cache --device --cuda-graph --fast-load -> backend_from_args(args)
    add_generation_flags(p, N)  --max-new-tokens and --greedy --temperature --top-k --top-p --repetition-penalty --seed
                                                                      -> sampling_from_args(args)
    add_artifact_flags(p)  OUT and --no-verify

Every command that runs graphs (run, chat, serve, quantize, bench, build) takes the same backend
flags, so an engine built by `edgevl build --max-context 8192` is the one `edgevl run
--max-context 8192` finds.
"""

from __future__ import annotations

import sys
from pathlib import Path


def logger(prefix: str):
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- artifact
def add_artifact_flags(p, what: str = "folder written by `edgevl export` (or `edgevl quantize`)") -> None:
    p.add_argument("artifact", metavar="OUT", help=what)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")


# ----------------------------------------------------------------------------- backend
def add_backend_flags(p, backend_help: str | None = None, multiple: bool = False, max_batch: int | None = None) -> None:
    """`multiple`: --backend takes several names (bench sweeps them); `max_batch`: the command's default for
    --max-batch (serve: 8; otherwise 1, what one prompt needs)."""
    from edgevl.runtime.backends import BACKENDS
    g = p.add_argument_group("backend")
    help_text = backend_help or ("execution backend (default: the fastest available here, see `edgevl doctor`; "
                                 "the choice is printed)")
    if multiple:
        g.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                       help=help_text + f"; several to sweep them ({', '.join(BACKENDS)})")
    else:
        g.add_argument("--backend", choices=list(BACKENDS), default=None, help=help_text)
    g.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads per graph (0 = onnxruntime's default)")
    g.add_argument("--max-context", type=int, metavar="N",
                   help="most tokens per sequence, prompt + generated: the KV-cache size (TensorRT engines are "
                        "built for it; default 4096 for trt/ort-trt, the model's context otherwise)")
    g.add_argument("--max-batch", type=int, metavar="N", default=max_batch,
                   help="most sequences decoded together: the rows `edgevl serve` batches requests into (each a KV "
                        "cache of --max-context positions) and the largest batch TensorRT engines are built for "
                        f"(default: {max_batch or 1})")
    g.add_argument("--max-image-patches", type=int, metavar="N",
                   help="most 14x14-pixel patches per image the vision engine accepts (default 4096 = 896x896 "
                        "pixels; a 448x448 image is 1024)")
    g.add_argument("--precision", choices=["graph", "fp16", "int8"], default="graph",
                   help="TensorRT precision: graph = the artifact's own types (strongly typed), fp16 = allow fp16 "
                        "for an fp32 export, int8 = allow int8 (quantized exports); default: graph")
    g.add_argument("--engine-cache", metavar="DIR",
                   help="where engines are cached (default: $EDGEVL_CACHE or ~/.cache/edgevl)")
    g.add_argument("--device", type=int, default=0, metavar="N", help="GPU index (default: 0)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: capture decode steps as CUDA graphs and replay them (fixed-address inputs, KV "
                        "buffers and outputs; greedy tokens come back as B integers per step). Not yet measured on "
                        "a GPU")
    g.add_argument("--fast-load", action="store_true",
                   help="ort-cpu: skip onnxruntime's pre-packing of float (fp32/fp16) weights at load: a 2B-width "
                        "fp32 decoder loads in ~0.1 s instead of 2-9 s, vision runs ~10 %% and decode ~5-10 %% "
                        "slower; quantized graphs stay packed. For one-shot runs of float exports, not servers")
    g.add_argument("--int8-prefill", action="store_true",
                   help="ort-cpu, w4a16 artifacts: run prompts (prefill) on int8 copies of the 4-bit weights made at "
                        "load, decode steps on the 4-bit ones: ~2x faster prefill for one more byte per weight in "
                        "memory and a longer load; tokens can differ from the plain w4a16 run's")


def backend_options(args, log=None):
    """The backend flags -> BackendOptions (validated there)."""
    from edgevl.runtime.backends import BackendOptions
    from edgevl.runtime.limits import validate_threads
    return BackendOptions(threads=validate_threads(args.threads, "--threads"), prepack=not args.fast_load, device_id=args.device,
                          max_batch=args.max_batch, max_context=args.max_context,
                          max_image_patches=args.max_image_patches, precision=args.precision,
                          cache_dir=Path(args.engine_cache) if args.engine_cache else None,
                          cuda_graph=args.cuda_graph, int8_prefill=args.int8_prefill,
                          log=log or logger("backend"))


def backend_from_args(args, log=None, name: str | None = ...):
    """The Backend the flags ask for (one name; `name` overrides --backend), or EdgevlError naming what is
    missing."""
    from edgevl.runtime.backends import get_backend
    return get_backend(args.backend if name is ... else name, backend_options(args, log))


# ----------------------------------------------------------------------------- generation
def add_generation_flags(p, max_new_tokens: int, what: str = "stop after N generated tokens") -> None:
    """--max-new-tokens and the sampling flags."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"{what} (default: {max_new_tokens})")
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (overrides sampling settings)")
    g.add_argument("--temperature", type=float, help="sampling temperature, 0..2 (0 = greedy)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with probability >= p, 0 < p <= 1")
    g.add_argument("--repetition-penalty", type=float, help="penalty > 1 discourages repeating seen tokens")
    g.add_argument("--seed", type=int, help="random seed for sampling, >= 0 (default: nondeterministic)")


def sampling_from_args(args) -> dict:
    """Sampling flags -> Pipeline sampling keywords, checked by the runtime's own rules (the same as the
    server's) before anything loads; flags not given keep the model's generation_config."""
    from edgevl.errors import EdgevlError
    from edgevl.runtime.sampling import sampling_problem, show_value
    if args.max_new_tokens < 1:
        raise EdgevlError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}.")
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        problem = None if value is None else sampling_problem(name, value)
        if problem:
            raise EdgevlError(f"--{name.replace('_', '-')} {problem}, got {show_value(value)}.")
    if args.greedy:
        sampling = {"do_sample": False}
    else:
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        if any(v is not None for v in sampling.values()):
            sampling["do_sample"] = True
    return {**sampling, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def load_pipeline(args):
    """The artifact named by OUT on the backend the flags ask for."""
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.runners import share_thread_pool
    backend = backend_from_args(args)            # checks --threads first
    share_thread_pool(args.threads)
    return Pipeline.load(args.artifact, backend=backend, verify=not args.no_verify)
