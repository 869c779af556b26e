"""Bad input from a user or a downloaded artifact: one sentence and exit 2, nothing unbounded, no traceback.

(The server's classes are in tests/serve/test_hardening.py and tests/serve/test_fuzz.py, the manifest's in
tests/artifact/test_manifest.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgevl.artifact import load_artifact
from edgevl.artifact.folder import MANIFEST, hash_files, sha256_file
from edgevl.cli import main
from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.template import ChatTemplate

PY = [sys.executable, "-m", "edgevl"]


def _one_sentence(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------- CLI values
@pytest.mark.parametrize("flags,fragment", [
    (["--seed", "-1"], "--seed"), (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-p", "2"], "--top-p"),
    (["--top-p", "nan"], "--top-p"), (["--top-k", "-5"], "--top-k"), (["--repetition-penalty", "0"], "--repetition"),
    (["--repetition-penalty", "-1"], "--repetition"), (["--threads", "-1"], "--threads"),
    (["--threads", "10000"], "--threads"), (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_run_and_chat_refuse_bad_values_with_the_servers_rules(tiny_artifact, capsys, flags, fragment):
    _one_sentence(capsys, main(["run", str(tiny_artifact), "--prompt", "hi", *flags]), fragment)
    if flags[0] != "--max-new-tokens":
        _one_sentence(capsys, main(["chat", str(tiny_artifact), *flags]), fragment)


def test_a_prompt_that_is_not_utf8_is_one_sentence(tiny_artifact):
    proc = subprocess.run([*PY, "run", str(tiny_artifact), "--prompt", b"caf\xe9 \xff"], capture_output=True,
                          timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and "not valid UTF-8" in err


def test_chat_keeps_going_after_a_line_that_is_not_utf8(tiny_artifact):
    proc = subprocess.run([*PY, "chat", str(tiny_artifact), "--max-new-tokens", "3"],
                          input=b"caf\xe9 \xff\nhello\n/exit\n", capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err and "UTF-8" in err
    assert proc.stdout.decode().count("assistant>") == 1                  # the next line still got an answer


# ----------------------------------------------------------------------------- chat templates
HOSTILE = {
    "huge string": "{{ 'A' * 10**9 }}",
    "huge power": "{{ 10 ** 100000000 }}",
    "padding method": "{{ 'x'.ljust(10**9) }}",
    "output past the limit": "{% for i in range(99999) %}{{ 'A' * 200 }}{% endfor %}",
    "loops that print nothing": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "range too big": "{{ range(10**9) | list }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "undefined call": "{{ nothing() }}",
    "raise_exception": "{{ raise_exception('no') }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_chat_template_is_bounded(name):
    template = ChatTemplate(HOSTILE[name], max_seconds=1.0)
    t0 = time.perf_counter()
    with pytest.raises(EdgevlError):
        template.render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("source", ["{% for %}", "{{ unclosed", "{% if x %}"])
def test_a_template_with_a_syntax_error_is_one_sentence(source):
    with pytest.raises(EdgevlError, match="not valid jinja"):
        ChatTemplate(source)


def _artifact_with(tiny_artifact, tmp_path, name: str, content: bytes) -> Path:
    """A copy of the tiny artifact with one file replaced, manifest re-hashed (as a tampered download would be)."""
    folder = tmp_path / "art"
    shutil.copytree(tiny_artifact, folder)
    (folder / name).write_bytes(content)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = hash_files(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_long_rendered_prompt_is_refused_before_it_is_tokenized(tiny_artifact, tmp_path):
    from edgevl.runtime.pipeline import Pipeline
    folder = _artifact_with(tiny_artifact, tmp_path, "chat_template.jinja", b"{{ 'A ' * 3000000 }}")
    pipe = Pipeline.load(folder)
    t0 = time.perf_counter()
    with pytest.raises(EdgevlError, match="at least .* tokens long"):
        pipe.prepare("hi")
    assert time.perf_counter() - t0 < 5                                    # 6 MB of text never tokenized


@pytest.mark.parametrize("content", [b"\xff\xfe{{ x }}", b"{% for %}"])
def test_a_broken_template_file_is_one_sentence_at_load(tiny_artifact, tmp_path, capsys, content):
    folder = _artifact_with(tiny_artifact, tmp_path, "chat_template.jinja", content)
    _one_sentence(capsys, main(["run", str(folder), "--prompt", "hi"]), "edgevl run: error:")


@pytest.mark.parametrize("content", [b"", b"not json", b"{}", b'{"model": 5}', b"[" * 100000])
def test_a_broken_tokenizer_is_one_sentence(tiny_artifact, tmp_path, capsys, content):
    folder = _artifact_with(tiny_artifact, tmp_path, "tokenizer.json", content)
    _one_sentence(capsys, main(["run", str(folder), "--prompt", "hi"]), "tokenizer")


def test_a_huge_tokenizer_is_refused_before_it_is_read(tiny_artifact, tmp_path):
    from edgevl.runtime.inputs.prompt import Tokenizer
    path = tmp_path / "tokenizer.json"
    with open(path, "wb") as f:
        f.truncate(200 << 20)
    with pytest.raises(EdgevlError, match="larger than"):
        Tokenizer(path)


@pytest.mark.parametrize("content", [b'{"temperature": "hot", "do_sample": true}', b'{"top_k": [1]}', b"[1, 2]",
                                     b"\xff"])
def test_a_generation_config_with_wrong_types_is_one_sentence(tiny_artifact, tmp_path, capsys, content):
    folder = _artifact_with(tiny_artifact, tmp_path, "generation_config.json", content)
    _one_sentence(capsys, main(["run", str(folder), "--prompt", "hi"]), "generation_config.json")


# ----------------------------------------------------------------------------- export
def test_a_model_folder_without_weights_or_with_a_bad_config_is_one_sentence(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    _one_sentence(capsys, main(["export", str(folder), "-o", str(tmp_path / "a")]), "no weights")
    (folder / "config.json").write_text("{not json")
    _one_sentence(capsys, main(["export", str(folder), "-o", str(tmp_path / "b")]), "config.json is not valid JSON")
    (folder / "config.json").write_bytes(b"\xff\xfe")
    _one_sentence(capsys, main(["export", str(folder), "-o", str(tmp_path / "c")]), "not valid JSON")
    assert not list(tmp_path.glob(".*partial*"))


def test_sigterm_during_export_leaves_nothing_behind(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*PY, "export", str(tiny_model_dir), "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and b"Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def _files(folder: Path) -> dict[str, str]:
    """Every file of the folder, the manifest included, by relative path: its sha256."""
    return {**hash_files(folder), MANIFEST: sha256_file(folder / MANIFEST)}


def _greedy_tokens(artifact: Path, capsys) -> list[int]:
    assert main(["run", str(artifact), "--prompt", "Describe.", "--max-new-tokens", "4", "--greedy", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]


def test_bad_input_never_changes_the_artifact_it_reads(tiny_artifact, tmp_path, capsys):
    """Self-contained (it was one load after the other tests, so it proved something only when they ran first, in
    that order): each refused command that reads the artifact leaves every file of it as it was, and afterwards the
    artifact still verifies and gives the same greedy tokens."""
    before = _files(tiny_artifact)
    tokens = _greedy_tokens(tiny_artifact, capsys)
    art = str(tiny_artifact)
    refused = [
        ["run", art, "--prompt", "hi", "--seed", "-1"],
        ["chat", art, "--temperature", "nan"],
        ["run", art, "--prompt", "hi", "--threads", "10000"],
        ["run", art, "--prompt", "hi", "--image", str(tmp_path / "missing.png")],
        ["run", art, "--prompt", "hi " * 100_000],                               # longer than the context
        ["quantize", art, "-o", art, "--recipe", "int8", "--force"],             # the output is the input
    ]
    for argv in refused:
        _one_sentence(capsys, main(argv))
        assert _files(tiny_artifact) == before, argv
    proc = subprocess.run([*PY, "run", art, "--prompt", b"caf\xe9 \xff"], capture_output=True, timeout=120)
    assert proc.returncode == 2 and _files(tiny_artifact) == before
    load_artifact(tiny_artifact)                                                 # verifies every hash
    assert _greedy_tokens(tiny_artifact, capsys) == tokens
