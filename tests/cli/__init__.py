"""Tests of the `edgevl` command line (edgevl/cli/), and what they share: the command run in a fresh process, the
one-sentence error check, and one command's parser on its own."""

from __future__ import annotations

import argparse
import subprocess
import sys


def edgevl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgevl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_sentence_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def parse_command(add_parser, argv):
    """argv parsed by a parser holding only the one command `add_parser` adds."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)
