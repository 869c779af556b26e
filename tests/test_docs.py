"""The docs cannot drift from the CLI: every `edgevl` command shown in README.md and docs/*.md is checked against the
real argument parser, every `make` target against the Makefile, every Python block compiles.

- a shell block's `edgevl ...` line (continuations joined, comments dropped) must parse as it stands;
- anywhere else (synopses like `edgevl run OUT [--image PATH ...]`, inline code in the prose) every `--flag` named
  after `edgevl COMMAND` must be an option of that command.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from edgevl.cli import build_parser

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
EDGEVL = re.compile(r"(?:^|[\s`(/])edgevl ([a-z]+)\b([^`\n]*)")
SHELL = {"sh", "bash", "console", "shell"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(2).lower(), m.group(3)) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """A shell block's commands: continuations joined, comments and prompts dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*\$ ", "", line)
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def edgevl_argv(line: str) -> list[str] | None:
    """The arguments after `edgevl` of a shell line's first edgevl command, or None when it runs none."""
    for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]                                  # VAR=value prefixes
        if words and (words[0] == "edgevl" or words[0].endswith("/edgevl")):
            return words[1:]
        if words[:3] in (["python", "-m", "edgevl"], ["python3", "-m", "edgevl"]):
            return words[3:]
    return None


def doc_ids():
    return [str(p.relative_to(ROOT)) for p in DOCS]


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_shell_commands_in_the_docs_parse(doc):
    parser = build_parser()
    commands = subcommands()
    makefile = (ROOT / "Makefile").read_text()
    problems = []
    for lang, body in blocks(doc.read_text()):
        if lang not in SHELL:
            continue
        for line in shell_lines(body):
            argv = edgevl_argv(line)
            if argv is not None and argv and argv[0] in commands:
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    problems.append(line)
            for target in re.findall(r"(?:^|&&\s*|\s)make ([a-z][\w-]*)", line):
                if not re.search(rf"^{re.escape(target)}:", makefile, re.M):
                    problems.append(f"{line}  (no make target {target})")
    assert not problems, f"{doc.name}: commands the CLI does not take:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_every_flag_named_after_an_edgevl_command_exists(doc):
    commands = subcommands()
    text = doc.read_text()
    problems = []
    for m in EDGEVL.finditer(text):
        name, rest = m.group(1), m.group(2)
        if name not in commands:
            continue
        known = set(commands[name]._option_string_actions)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in known:
                problems.append(f"edgevl {name} {flag}")
    assert not problems, f"{doc.name} names options the CLI does not have: {sorted(set(problems))}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_python_blocks_compile(doc):
    for lang, body in blocks(doc.read_text()):
        if lang in ("python", "py"):
            compile(body, f"{doc.name}:python block", "exec")


def test_the_checks_see_the_readmes_commands():
    """Guard against a check that silently finds nothing: the README's set-up, demo and test commands are seen."""
    lines = [line for lang, body in blocks((ROOT / "README.md").read_text()) if lang in SHELL
             for line in shell_lines(body)]
    assert any(edgevl_argv(line) and edgevl_argv(line)[0] == "run" for line in lines)
    assert any("make setup" in line for line in lines) and any("make test" in line for line in lines)


LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's anchor of every heading in a Markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    text = FENCE.sub("", doc.read_text())
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ +(.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_every_relative_link_points_at_something_that_exists(doc):
    problems = []
    links = LINK.findall(FENCE.sub("", doc.read_text()))
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):               # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            problems.append(f"{link}  (no {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{link}  (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not problems, f"{doc.name}: links to nothing:\n" + "\n".join(problems)


def test_the_link_check_sees_links():
    """Guard against a link pattern that silently matches nothing: the README links to docs/ and the check
    tells a missing file and a missing heading from existing ones."""
    readme = (ROOT / "README.md").read_text()
    assert any(link.startswith("docs/") for link in LINK.findall(readme))
    assert "the-token-budget" in anchors(ROOT / "docs" / "usage.md")
    assert "no-such-heading" not in anchors(ROOT / "docs" / "usage.md")
