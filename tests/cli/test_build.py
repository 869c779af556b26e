"""`edgevl build` (and `edgevl doctor`'s options): help for every option, and nothing to build for ort-cpu."""

from __future__ import annotations

import argparse
from tests.cli import parse_command


def test_gpu_cli_options_have_help():
    from edgevl.cli.build import add_parser as add_build_parser
    from edgevl.cli.doctor import add_parser as add_doctor_parser
    for add in (add_build_parser, add_doctor_parser):
        parser = argparse.ArgumentParser()
        add(parser.add_subparsers())
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for p in sub.choices.values():
            assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]


def test_build_for_ort_cpu_has_nothing_to_build(tiny_artifact, capsys):
    from edgevl.cli.build import add_parser as add_build_parser
    args = parse_command(add_build_parser, ["build", str(tiny_artifact), "--backend", "ort-cpu", "--no-verify"])
    assert args.func(args) == 0
    assert "nothing to build" in capsys.readouterr().err
