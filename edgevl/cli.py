"""`edgevl` command line: one entry point, one subcommand per stage.

Each subcommand is a `add_<name>_parser(subparsers)` + `cmd_<name>(args)` pair.
Export needs the [export] extra (torch, transformers); `run` needs only the runtime.
User-facing problems (EdgevlError) print one sentence and exit 2; pass --debug for
the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgevl import __version__
from edgevl.bench.cli import add_bench_parser
from edgevl.calibrate.cli import add_quantize_parser
from edgevl.errors import EdgevlError
from edgevl.gpu_cli import (
    add_backend_arguments,
    add_build_parser,
    add_doctor_parser,
    backend_options,
)
from edgevl.serve.cli import add_serve_parser

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------- export
def add_export_parser(sub) -> None:
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
    p.add_argument("--opset", type=int, default=18, metavar="N",
                   help="ONNX opset of the default domain, 18..23 (default: 18)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    try:
        from edgevl.export.exporter import export_model
    except ImportError as e:
        raise EdgevlError(f"`edgevl export` needs the export extra ({e.name} is missing); "
                          f"install it with `pip install 'edgevl[export]'`.") from None
    out = export_model(args.model, args.output, dtype=args.dtype, opset=args.opset, force=args.force,
                       log=lambda msg: print(f"[export] {msg}", file=sys.stderr))
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- run
def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text from an export folder (torch-free runtime)",
        description="Preprocess images, run the vision encoder, build the prompt with the model's chat "
                    "template and generate with a KV cache. Text streams to stdout as it is generated; "
                    "sampling defaults come from the model's generation_config.json.")
    p.add_argument("artifact", metavar="OUT", help="folder written by `edgevl export` (or `edgevl quantize`)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several images in one prompt (in order)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file (needs the video extra, PyAV); repeatable; images come first in the message")
    p.add_argument("--fps", type=float, default=2.0,
                   help="frames per second sampled from each video (default: 2, as Qwen2-VL was trained)")
    p.add_argument("--max-frames", type=int, default=768, metavar="N",
                   help="at most N frames per video (default: 768); bounds the number of video tokens")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="stop after N generated tokens (default: 128)")
    add_sampling_args(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (not included in the output); repeatable")
    add_runtime_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (prompt_token_ids, token_ids, text, timings) instead of "
                        "streaming text")
    p.set_defaults(func=cmd_run)


def add_sampling_args(p) -> None:
    p.add_argument("--greedy", action="store_true", help="greedy decoding (overrides sampling settings)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: generation_config)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--repetition-penalty", type=float, help="penalty > 1 discourages repeating seen tokens")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: nondeterministic)")


def sampling_from_args(args) -> dict:
    """CLI flags -> Pipeline sampling keywords; flags not given keep the model's generation_config."""
    if args.greedy:
        sampling = {"do_sample": False}
    else:
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        if any(v is not None for v in sampling.values()):
            sampling["do_sample"] = True
    return {**sampling, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def add_runtime_args(p) -> None:
    add_backend_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per graph (0 = onnxruntime's default)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")


def load_pipeline(args):
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(args.artifact, backend=args.backend, verify=not args.no_verify,
                         options=backend_options(args))


def cmd_run(args) -> int:
    if args.max_new_tokens < 1:
        raise EdgevlError("--max-new-tokens must be at least 1.")
    pipe = load_pipeline(args)
    sampling = sampling_from_args(args)
    from edgevl.runtime.video import load_video
    videos = [load_video(v, fps=args.fps, max_frames=args.max_frames, temporal_patch_size=pipe.video_temporal,
                         settings=pipe.video_settings)
              for v in args.video]

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = pipe.generate(args.prompt, images=args.image, videos=videos, max_new_tokens=args.max_new_tokens,
                           stop=args.stop, on_text=None if args.json else stream, **sampling)
    if args.json:
        print(json.dumps({**result.to_json(), "backend": pipe.backend.name}))
    else:
        print(flush=True)
        t = result.timings
        per_token = (sum(t["decode_s_per_token"]) / len(t["decode_s_per_token"]) * 1e3
                     if t["decode_s_per_token"] else float("nan"))
        print(f"[{len(result.token_ids)} tokens, {result.finish_reason}; preprocess {t['preprocess_s']*1e3:.0f} ms, "
              f"vision {t['vision_s']*1e3:.0f} ms, prefill {t['prefill_s']*1e3:.0f} ms, "
              f"decode {per_token:.1f} ms/token on {pipe.backend.name}]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- chat
CHAT_HELP = """commands: /image PATH  attach an image to your next message (repeatable)
          /video PATH  attach a video, sampled at 2 fps (repeatable; needs the video extra, PyAV)
          /reset       forget the conversation (and its KV cache)
          /exit        quit (or Ctrl-D)"""


def add_chat_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="interactive multi-turn chat in the terminal",
        description="Chat with an export. Earlier turns stay in the KV cache, so each turn only prefills "
                    "the new tokens. When the conversation outgrows the model's context you are asked to "
                    "/reset.\n\n" + CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="OUT", help="folder written by `edgevl export` (or `edgevl quantize`)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="longest reply in tokens (default: 512)")
    add_sampling_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from edgevl.runtime.chat import ChatSession

    session = ChatSession(load_pipeline(args), system=args.system)
    sampling = sampling_from_args(args)
    pending: dict[str, list[str]] = {"image": [], "video": []}   # attachments for the next message
    interactive = sys.stdin.isatty()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not _chat_command(line, session, pending):
                return 0
            continue
        started = []

        def show(delta: str) -> None:
            if not started:  # the prefix only once text arrives: a failed turn prints nothing
                started.append(sys.stdout.write("assistant> "))
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            session.send(line, images=pending["image"], videos=pending["video"], max_new_tokens=args.max_new_tokens,
                         on_text=show, **sampling)
            print()
        except EdgevlError as e:  # a bad image or video, no PyAV, a full context: say so and keep chatting
            print(f"error: {e}", file=sys.stderr)
        for attached in pending.values():
            attached.clear()


def _chat_command(line: str, session, pending: dict[str, list[str]]) -> bool:
    """One /command of `edgevl chat`; returns False to quit."""
    command, *rest = line.split(maxsplit=1)
    arg = rest[0] if rest else ""    # the rest of the line: a path may contain spaces
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        for attached in pending.values():
            attached.clear()
        print("[conversation reset]", file=sys.stderr)
    elif command in ("/image", "/video"):
        kind = command[1:]
        if not arg:
            print(f"usage: {command} PATH", file=sys.stderr)
        else:
            # Loaded when the message is sent, like images: a bad file fails that turn, not the chat.
            pending[kind].append(arg)
            print(f"[{kind} attached: {arg}]", file=sys.stderr)
    else:
        print(f"unknown command {command}\n{CHAT_HELP}", file=sys.stderr)
    return True


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevl", description="Qwen2-VL from a Hugging Face checkpoint to verified ONNX inference.")
    parser.add_argument("--version", action="version", version=f"edgevl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_export_parser(sub)
    add_run_parser(sub)
    add_quantize_parser(sub)
    add_chat_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_build_parser(sub)
    add_doctor_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgevlError as e:
        if args.debug:
            raise
        print(f"edgevl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
