"""The `edgevl` command: help texts, bad input (one sentence, exit 2, no traceback), the torch-free runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from edgevl.cli import build_parser


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


@pytest.mark.parametrize("command", ["export", "run", "chat", "serve", "bench", "build", "doctor"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert command in edgevl(command, "--help").stdout


def test_run_json_output(tiny_artifact, photos):
    proc = edgevl("run", tiny_artifact, "--image", photos["coffee"], "--prompt", "What is this?",
                  "--max-new-tokens", "6", "--greedy", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"prompt_token_ids", "token_ids", "text", "timings"}
    assert 1 <= len(out["token_ids"]) <= 6
    assert {"preprocess_s", "vision_s", "prefill_s", "decode_s_per_token"} <= set(out["timings"])


def test_run_streams_text(tiny_artifact):
    proc = edgevl("run", tiny_artifact, "--prompt", "Hello there", "--max-new-tokens", "8", "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "ms/token" in proc.stderr


def test_chat_reads_turns_from_stdin(tiny_artifact, photos, tmp_path):
    turns = f"Hello\n/image {photos['coffee']}\nWhat is this?\n/image {tmp_path / 'missing.png'}\nAnd this?\n" \
            "/reset\nHi again\n"
    proc = subprocess.run([sys.executable, "-m", "edgevl", "chat", str(tiny_artifact), "--max-new-tokens", "5",
                           "--greedy"], input=turns, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3          # the missing image fails its turn, not the chat
    assert "missing.png" in proc.stderr and "conversation reset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chat_video_command(tiny_artifact, video_file, tmp_path):
    assert "/video PATH" in edgevl("chat", "--help").stdout
    turns = f"/video {tmp_path / 'missing.mp4'}\nWhat happens?\n/video {video_file}\nWhat happens now?\nAnd then?\n"
    proc = subprocess.run([sys.executable, "-m", "edgevl", "chat", str(tiny_artifact), "--max-new-tokens", "5",
                           "--greedy"], input=turns, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2          # the missing video fails its turn, not the chat
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.mp4" in errors[0] and errors[0].endswith(".")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(os.urandom(2048))
    return path


def test_missing_image(tiny_artifact, tmp_path):
    assert_one_sentence_error(edgevl("run", tiny_artifact, "--image", tmp_path / "nope.jpg", "--prompt", "x"),
                              "nope.jpg")


def test_corrupt_image(tiny_artifact, corrupt_image):
    assert_one_sentence_error(edgevl("run", tiny_artifact, "--image", corrupt_image, "--prompt", "x"),
                              "broken.jpg")


def test_unsupported_image_mode(tiny_artifact, tmp_path):
    from PIL import Image
    path = tmp_path / "complex.tiff"
    Image.new("F", (64, 64)).save(path)      # 32-bit float pixels: RGB conversion would clip them
    proc = edgevl("run", tiny_artifact, "--image", path, "--prompt", "x")
    assert_one_sentence_error(proc, "complex.tiff")


def test_empty_prompt(tiny_artifact):
    assert_one_sentence_error(edgevl("run", tiny_artifact, "--prompt", "   "), "prompt is empty")


def test_prompt_longer_than_context(tiny_artifact):
    words = "a " * 33000  # ~33k tokens; the tiny model has a 32768-token context
    assert_one_sentence_error(edgevl("run", tiny_artifact, "--prompt", words), "context")


def test_other_format_version(tiny_artifact, tmp_path):
    copy = shutil.copytree(tiny_artifact, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_sentence_error(edgevl("run", copy, "--prompt", "x"), "format version 999")


def test_hash_mismatch(tiny_artifact, tmp_path):
    copy = shutil.copytree(tiny_artifact, tmp_path / "tampered")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    assert_one_sentence_error(edgevl("run", copy, "--prompt", "x"), "tokenizer.json", "sha256")


def test_not_an_artifact(tmp_path):
    assert_one_sentence_error(edgevl("run", tmp_path, "--prompt", "x"), "manifest.json")


def test_export_unknown_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_sentence_error(edgevl("export", tmp_path / "m", "-o", tmp_path / "out"), "llama")
    assert not (tmp_path / "out").exists()


def test_export_missing_model_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = edgevl("export", "no-such-org/no-such-model", "-o", tmp_path / "out", env=env)
    assert_one_sentence_error(proc, "no-such-org/no-such-model")


def test_runtime_works_without_torch_and_transformers(tiny_artifact, photos):
    """Import and run edgevl.runtime in a process where importing torch or transformers fails."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        sys.modules["transformers"] = None
        from edgevl.runtime.pipeline import Pipeline
        pipe = Pipeline.load({str(tiny_artifact)!r})
        r = pipe.generate("Describe.", images=[{str(photos["coffee"])!r}], max_new_tokens=5, do_sample=False)
        assert len(r.token_ids) >= 1, r
        # onnx (a runtime dependency) is allowed: ort-cpu edits the in-place decoder's graph when loading it
        heavy = [m for m in ("torch", "transformers", "onnxscript") if sys.modules.get(m) is not None]
        assert not heavy, heavy
        print("ok", r.token_ids)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
