"""Tests of the `edgevl` command line (edgevl/cli/)."""

from __future__ import annotations

import argparse


def parse_command(add_parser, argv):
    """argv parsed by a parser holding only the one command `add_parser` adds."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)
