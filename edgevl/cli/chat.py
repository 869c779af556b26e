"""`edgevl chat OUT`: an interactive multi-turn chat in the terminal, the KV cache kept across turns."""

from __future__ import annotations

import argparse
import sys

from edgevl.cli.flags import (
    add_artifact_flags,
    add_backend_flags,
    add_generation_flags,
    load_pipeline,
    decoding_from_args,
)
from edgevl.errors import EdgevlError

HELP = """commands: /image PATH  attach an image to your next message (repeatable)
          /video PATH  attach a video, sampled at 2 fps (repeatable; needs the video extra, PyAV)
          /reset       forget the conversation (and its KV cache)
          /exit        quit (or Ctrl-D)"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="interactive multi-turn chat in the terminal",
        description="Chat with an export. Earlier turns stay in the KV cache, so each turn only prefills "
                    "the new tokens. When the conversation outgrows the model's context you are asked to "
                    "/reset.\n\n" + HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifact_flags(p)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    add_generation_flags(p, max_new_tokens=512, what="longest reply in tokens")
    add_backend_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from edgevl.runtime.chat import ChatSession

    session = ChatSession(load_pipeline(args), system=args.system)
    pending: dict[str, list[str]] = {"image": [], "video": []}   # attachments for the next message
    interactive = sys.stdin.isatty()
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            return 0
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8 text; type it again.", file=sys.stderr)
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, session, pending):
                return 0
            continue
        started = []

        def show(delta: str) -> None:
            if not started:  # the prefix only once text arrives: a failed turn prints nothing
                started.append(sys.stdout.write("assistant> "))
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            # a Decoding per turn: a --seed starts every reply's sampling from the same state, as a new run does
            session.send(line, images=pending["image"], videos=pending["video"], on_text=show,
                         decoding=decoding_from_args(args, session.pipe))
            print()
        except EdgevlError as e:  # a bad image or video, no PyAV, a full context: say so and keep chatting
            print(f"error: {e}", file=sys.stderr)
        for attached in pending.values():
            attached.clear()


def _command(line: str, session, pending: dict[str, list[str]]) -> bool:
    """One /command; returns False to quit."""
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
        print(f"unknown command {command}\n{HELP}", file=sys.stderr)
    return True
