"""`edgevl chat`: turns read from stdin, a video turn, and a missing file as one sentence."""

from __future__ import annotations

import subprocess
import sys

from tests.cli import edgevl


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
