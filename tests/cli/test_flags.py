"""The flags (cli/flags.py): every option of every command has help, and every numeric flag refuses nan, inf and values
outside its range by name, in one sentence.

The flags are found by walking the parser, so a numeric flag added later is covered (and one added with a bare
`type=int` / `type=float` fails `test_every_numeric_flag_has_a_range`)."""

from __future__ import annotations

import argparse

import pytest

from edgevl.cli import build_parser, main
from edgevl.cli.flags import Number
from tests.cli import edgevl


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _numeric_flags() -> list[tuple[str, str, Number]]:
    return [(command, action.option_strings[-1], action.type)
            for command, parser in _subparsers().items() for action in parser._actions
            if isinstance(action.type, Number)]


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """The least a command line needs to parse: its positionals and required options."""
    argv = []
    for action in parser._actions:
        value = action.choices and next(iter(action.choices)) or "x"
        if not action.option_strings and action.nargs in (None, "+"):
            argv.append(str(value))
        elif action.option_strings and action.required:
            argv += [action.option_strings[-1], str(value)]
    return argv


FLAGS = _numeric_flags()
IDS = [f"{command} {flag}" for command, flag, _ in FLAGS]


def test_every_numeric_flag_has_a_range():
    """No flag parses numbers without a Number: a bare int or float lets nan, inf and negatives through."""
    for command, parser in _subparsers().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{command} {action.option_strings}: use flags.whole/real"
    assert len(FLAGS) >= 50          # the walk found the commands' flags (not an empty parametrization)
    for command in ("run", "chat", "serve", "quantize", "bench", "triton", "export", "build", "doctor"):
        assert any(c == command for c, _, _ in FLAGS), command


def _refused(capsys, argv: list[str], flag: str, value: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{flag} must be" in lines[0] and repr(value) in lines[0], lines[0]


@pytest.mark.parametrize("command,flag,number", FLAGS, ids=IDS)
def test_nan_inf_and_out_of_range_values_are_one_sentence(capsys, command, flag, number):
    parser = _subparsers()[command]
    argv = [command, *_required(parser)]
    bad = ["nan", "-nan", "inf", "-inf", "1e999", "-1", "x", "", "0x10", "1\n2"]
    if number.whole:
        bad += ["1.5", "2e3"]
    if number.low is not None:
        bad.append(str(number.low) if number.above else str(number.low - 1))
    if number.high is not None:
        bad.append(str(number.high + 1) if number.whole else str(number.high * 1.5 + 1))
    for value in bad:
        _refused(capsys, [*argv, f"{flag}={value}"], flag, value)     # `=`: argparse takes "-inf" as a value


@pytest.mark.parametrize("command,flag,number", FLAGS, ids=IDS)
def test_values_at_the_edges_of_the_range_parse(command, flag, number):
    parser = _subparsers()[command]
    base = _required(parser)
    edges = [number.high] if number.high is not None else []
    if number.low is not None and not number.above:
        edges.append(number.low)
    elif number.low is not None:
        edges.append(number.low + 0.5 if number.high is None else min(number.low + 0.5, number.high))
    for edge in edges:
        args = parser.parse_args([*base, flag, str(edge)])
        value = getattr(args, next(a.dest for a in parser._actions if flag in a.option_strings))
        assert (value[-1] if isinstance(value, list) else value) == edge


@pytest.mark.parametrize("argv,fragment", [
    (["serve", "art", "--max-request-mb", "nan"], "--max-request-mb must be a number greater than 0"),
    (["serve", "art", "--max-video-mb", "inf"], "--max-video-mb must be a number greater than 0"),
    (["serve", "art", "--port", "0"], "--port must be a whole number from 1 to 65535"),
    (["run", "art", "--prompt", "p", "--fps", "nan"], "--fps must be a number greater than 0"),
    (["run", "art", "--prompt", "p", "--max-frames", "0"], "--max-frames must be a whole number of at least 2"),
    (["run", "art", "--prompt", "p", "--max-frames", "-4"], "--max-frames must be a whole number of at least 2"),
    (["bench", "art", "--prompt-tokens", "100", "nan"], "--prompt-tokens must be a whole number"),
    (["quantize", "art", "-o", "q", "--recipe", "int8", "--max-drop", "1.5"],
     "--max-drop must be a number from 0 to 1"),
])
def test_the_issues_cases_are_refused_before_anything_loads(capsys, argv, fragment):
    """`art` does not exist: the flag is refused while parsing, before the artifact is looked at."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err


def test_other_usage_errors_are_one_line_too(capsys):
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err and "edgevl run --help" in err, err
    assert main(["run", "art", "--prompt", "p", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-flag" in err, err


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0 and "--max-request-mb" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["export", "run", "chat", "serve", "bench", "build", "doctor"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert command in edgevl(command, "--help").stdout
