"""`edgevl` command line: one entry point, one module per command, shared flag groups in `flags.py`.

    export    edgevl/cli/export.py      a checkpoint -> an artifact folder
    run       edgevl/cli/run.py         one generation
    quantize  edgevl/cli/quantize.py    calibrated fp16 / int8 / w4a16 artifacts
    chat      edgevl/cli/chat.py        interactive multi-turn chat
    serve     edgevl/cli/serve.py       OpenAI-compatible HTTP server
    triton    edgevl/cli/triton.py      a Triton Inference Server model repository
    bench     edgevl/cli/bench.py       per-stage latency against transformers
    build     edgevl/cli/build.py       TensorRT engines ahead of time
    doctor    edgevl/cli/doctor.py      what this machine can run

Each module has `add_parser(subparsers)` and `run(args)`. User-facing problems (EdgevlError, a flag value out of
its range: flags.py, an OSError such as a full disk) print one sentence and exit 2; `--debug` shows the
traceback. SIGTERM ends a command like Ctrl-C does, so staged output folders are cleaned up either way.
"""

from __future__ import annotations

import signal
import sys
import threading

from edgevl import __version__
from edgevl.artifact.folder import os_reason
from edgevl.cli import bench, build, chat, doctor, export, quantize, run, serve, triton
from edgevl.cli.flags import Parser
from edgevl.errors import EdgevlError

EXIT_USER_ERROR = 2
COMMANDS = (export, run, quantize, chat, serve, triton, bench, build, doctor)


def build_parser() -> Parser:
    parser = Parser(
        prog="edgevl", description="Qwen2-VL from a Hugging Face checkpoint to verified ONNX inference.")
    parser.add_argument("--version", action="version", version=f"edgevl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt   # unwinds like Ctrl-C: `finally` blocks remove staged folders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:     # a bad flag: its one sentence is printed (--help and --version exit 0)
        if e.code == EXIT_USER_ERROR:
            return EXIT_USER_ERROR
        raise
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return args.func(args)
    except EdgevlError as e:
        if args.debug:
            raise
        print(f"edgevl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:   # the machine, not the code: a full disk, a read-only or forbidden path
        if args.debug:
            raise
        print(f"edgevl {args.command}: error: {os_reason(e)}.", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
