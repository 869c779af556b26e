"""`edgevl bench`: stage-by-stage latency, memory and roofline of artifacts, optionally against transformers."""

from __future__ import annotations

import sys
from pathlib import Path

from edgevl.artifact.folder import refuse_overlap
from edgevl.cli.flags import add_backend_flags, backend_options, logger, whole
from edgevl.errors import EdgevlError

MAX_BANDWIDTH_MIB = 1 << 16     # the bandwidth buffer (and its copy) is allocated: at most 64 GiB


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure per-stage latency, memory and rooflines of export folders",
        description="Time image preprocessing, the vision encoder, prefill (time to first token), decode per "
                    "token (and against context length) and end to end, with median / p90 / min over runs after "
                    "warm-up, peak host RSS (and GPU memory with a GPU), model load time, tokens/s, the decode "
                    "floor set by the measured memory bandwidth, and the vision and prefill FLOP rates against "
                    "the matrix-multiply rate measured in the same run. Several OUT folders, backends, image sizes, "
                    "prompt lengths and token counts are swept into one table. --reference hf runs transformers "
                    "on the source model in the same process and prints each stage's ratio; --reference llama.cpp "
                    "and openvino do the same with those engines' own tools (set up by `make bench-peers`). "
                    "Decoding is greedy and ignores EOS, so every run generates exactly --new-tokens tokens.")
    p.add_argument("artifacts", nargs="*", metavar="OUT",
                   help="export folders to measure (`edgevl export` / `edgevl quantize` output); optional with "
                        "--preset. Put them first: options that take several values swallow what follows")
    p.add_argument("--preset", metavar="NAME",
                   help="also measure a random-weight model of a real architecture (e.g. qwen2-vl-2b, "
                        "qwen2-vl-2b-l4), built and exported once under ~/.cache/edgevl/presets/NAME "
                        "($EDGEVL_CACHE; exported again when edgevl's exporter has changed since); random "
                        "weights make text meaningless but latency real")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="image file(s); each is a separate sweep point with one image in the prompt")
    p.add_argument("--image-size", action="extend", nargs="+", default=[], metavar="WxH",
                   help="synthetic photo-like image(s) of these sizes, e.g. 224x224 448x448 1344x756; 'none' "
                        "for a text-only prompt (default: 448x448 when no --image is given)")
    p.add_argument("--prompt", help="the user's text before any filler (default: 'Describe this image in detail.')")
    p.add_argument("--prompt-tokens", action="extend", nargs="+", type=whole(1), metavar="N",
                   help="total prompt length(s) in tokens, chat template and image tokens included; the text is "
                        "padded with filler to reach it (default: the prompt as is)")
    p.add_argument("--new-tokens", action="extend", nargs="+", type=whole(1), metavar="N",
                   help="tokens to generate per run, EOS ignored (default: 32)")
    p.add_argument("--runs", type=whole(1), default=5, metavar="N", help="measured runs per sweep point (default: 5)")
    p.add_argument("--warmup", type=whole(0), default=1, metavar="N",
                   help="discarded warm-up runs before them (default: 1)")
    p.add_argument("--reference", nargs="+", action="extend", default=[], choices=["hf", "llama.cpp", "openvino"],
                   metavar="ENGINE",
                   help="also measure other engines on the source model recorded in the manifest, with the same "
                        "image and prompt, and print edgevl/ENGINE per stage: 'hf' transformers (eager PyTorch, same "
                        "dtype, sdpa attention, in this process); 'llama.cpp' (llama-mtmd-cli on GGUF + mmproj at the "
                        "matching precision: F32, Q8_0, Q4_0) and 'openvino' (OpenVINO GenAI VLMPipeline at fp32/int8/"
                        "int4, default and f32 precision hints), each from its own environment set up once by "
                        "`make bench-peers`, run as subprocesses; several may be given")
    p.add_argument("--interleave", action="store_true",
                   help="with --reference hf: keep edgevl and transformers loaded and alternate their runs, so a "
                        "shared machine whose load drifts treats them alike (peak RSS is then both models together)")
    p.add_argument("--reference-model", metavar="PATH",
                   help="model folder for --reference hf when the manifest's source model is not available here")
    p.add_argument("--decode-contexts", action="extend", nargs="+", type=whole(1), default=[], metavar="N",
                   help="also time decode steps on a synthetic KV cache at these context lengths "
                        "(e.g. 512 1024 2048 4096)")
    p.add_argument("--json", metavar="PATH", help="write the full report (machine, settings, every run) as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG: decode latency vs context length and per-stage bars (needs matplotlib)")
    p.add_argument("--bandwidth-mib", type=whole(1, MAX_BANDWIDTH_MIB), default=512, metavar="N",
                   help="buffer size of the memory-bandwidth measurement in MiB (default: 512)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifacts' files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_backend_flags(p, backend_help="execution backend(s) to measure (default: ort-cpu)", multiple=True)
    p.set_defaults(func=run)


def config_from_args(args, log=lambda msg: None):
    from edgevl.bench.suite import BenchConfig

    artifacts = [Path(a).resolve() for a in args.artifacts]
    presets, notes = {}, []
    if args.preset:
        from edgevl.bench.preset_cache import RANDOM_WEIGHTS_NOTE, ensure_preset
        path = ensure_preset(args.preset, log=log).resolve()
        artifacts.insert(0, path)
        presets[str(path)] = args.preset
        notes.append(RANDOM_WEIGHTS_NOTE.format(name=args.preset))
    return BenchConfig(
        artifacts=artifacts, backends=args.backend or ["ort-cpu"], options=backend_options(args, _once(log)),
        images=args.image, image_sizes=args.image_size, prompt=args.prompt, prompt_tokens=args.prompt_tokens or [None],
        new_tokens=args.new_tokens or [32], runs=args.runs, warmup=args.warmup, reference=args.reference,
        reference_model=args.reference_model, interleave=args.interleave, decode_contexts=args.decode_contexts,
        verify=not args.no_verify, bandwidth_mib=args.bandwidth_mib, notes=notes, presets=presets,
        progress=False if args.no_progress else None)


def _once(log):
    """`log` that prints each message once: bench loads every engine warm-up + runs times, and a backend's load
    notes (which kernels a graph runs on) would repeat with each load."""
    seen = set()

    def log_once(msg: str) -> None:
        if msg not in seen:
            seen.add(msg)
            log(msg)
    return log_once


def _check_reports(args, artifacts) -> None:
    """--json / --markdown / --plot never overwrite or write into what bench reads."""
    inputs = ([("the artifact", Path(a)) for a in artifacts] + [("the image", Path(i)) for i in args.image]
              + ([("the reference model", Path(args.reference_model))] if args.reference_model else []))
    for path in (args.json, args.markdown, args.plot):
        if path:
            refuse_overlap(Path(path), inputs, what="the report")


def run(args) -> int:
    from edgevl.bench import report as rep
    from edgevl.bench.plot import write_plot
    from edgevl.bench.suite import run_bench

    if not args.artifacts and not args.preset:
        raise EdgevlError("give at least one export folder OUT or --preset NAME.")

    from edgevl.runtime.backends.ort_session import share_thread_pool
    log = logger("bench")
    _check_reports(args, args.artifacts)            # before any work
    config = config_from_args(args, log)            # checks --threads first
    _check_reports(args, config.artifacts)          # a --preset's export too
    share_thread_pool(args.threads)     # as run / chat / serve do (bench never runs onnxruntime's quantizers)
    result = run_bench(config, log=log)
    sys.stdout.write(rep.render_text(result))
    for path, write in ((args.json, rep.write_json), (args.plot, write_plot),
                        (args.markdown, lambda r, p: Path(p).write_text(rep.render_text(r, markdown=True)))):
        if path:
            write(result, path)
            log(f"wrote {path}")
    return 0
