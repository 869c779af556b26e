"""Tests of `edgevl triton` (edgevl/serve/triton/), and what they share: a small config.pbtxt reader, the command run
in-process, its one-sentence errors, and image messages."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path

from edgevl.cli import main


ROOT = Path(__file__).resolve().parents[3]


# ----------------------------------------------------------------------------- a small config.pbtxt reader
_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages as dicts, lists flattened), enough to read a config.pbtxt
    back without Triton's protos (tritonclient's model_config_pb2 checks it strictly where installed)."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot read config.pbtxt at {text[pos:pos + 20]!r}")
            break
        pos = m.end()
        if m.group(1):
            tokens.append(("str", re.sub(r"\\(.)", r"\1", m.group(1)[1:-1])))
        elif m.group(2):
            tokens.append(("sym", m.group(2)))
        elif m.group(3):
            tokens.append(("word", m.group(3)))

    def value(i):
        kind, tok = tokens[i]
        if tok == "{":
            return message(i + 1, "}")
        if kind == "str":
            return tok, i + 1
        if tok in ("true", "false"):
            return tok == "true", i + 1
        try:
            return int(tok), i + 1
        except ValueError:
            return tok, i + 1          # an enum name

    def message(i, end):
        out: dict = {}
        while i < len(tokens) and tokens[i][1] != end:
            name = tokens[i][1]
            i += 1
            if tokens[i][1] == ":":
                i += 1
            if tokens[i][1] == "[":
                i += 1
                while tokens[i][1] != "]":
                    v, i = value(i)
                    out.setdefault(name, []).append(v)
                    if tokens[i][1] == ",":
                        i += 1
                i += 1
                out.setdefault(name, [])
            else:
                v, i = value(i)
                out.setdefault(name, []).append(v)
        return out, i + 1

    return message(0, None)[0]


def parameters_of(config: dict) -> dict[str, str]:
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in config.get("parameters", [])}


def model_config_json(config: dict) -> str:
    """What Triton hands `initialize` as args["model_config"] (the parts the handler reads)."""
    return json.dumps({
        "name": config["name"][0],
        "model_transaction_policy": {"decoupled": config["model_transaction_policy"][0]["decoupled"][0]},
        "parameters": {k: {"string_value": v} for k, v in parameters_of(config).items()},
    })


def read_config(model_dir: Path) -> dict:
    return parse_pbtxt((model_dir / "config.pbtxt").read_text())


# ----------------------------------------------------------------------------- helpers
def edgevl(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_sentence(err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgevl triton: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(prompt: str, url: str | None = None) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": url}} if url else {"type": "image"}
    return [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]
