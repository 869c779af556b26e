"""`edgevl run`: JSON and streamed output, bad input (one sentence, exit 2, no traceback), and the torch-free
runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.cli import assert_one_sentence_error, edgevl


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
