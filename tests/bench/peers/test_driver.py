"""bench/peers/driver.py, the code the peers share: a tool's status, output and peak RSS, build files written atomically
and once, and the source key that follows the model's files."""

from __future__ import annotations

import sys

import pytest

from edgevl.bench.peers import driver
from edgevl.errors import EdgevlError


def test_run_tool_reports_status_output_and_peak_rss():
    run = driver.run_tool([sys.executable, "-c", "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * "
                           "len(b[::4096]); time.sleep(0.2); print('out'); print('first\\nlast words', file=sys.stderr);"
                           " sys.exit(3)"])
    assert (run.returncode, run.stdout) == (3, "out\n") and run.max_rss_bytes > 300 << 20 and run.wall_s > 0
    ballast = bytearray(600 << 20)          # a big parent (edgevl with models loaded) ...
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = driver.run_tool([sys.executable, "-c", "import time; time.sleep(0.2)"])
    assert 0 < small.max_rss_bytes < 200 << 20          # ... is not counted as its child's memory
    del ballast
    with pytest.raises(EdgevlError, match=r"the tool failed \(exit status 3\): last words"):
        driver.check(run, "the tool")
    with pytest.raises(EdgevlError, match="ran past 1 s"):
        driver.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)


def test_build_file_is_atomic_and_built_once(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.write_text("done")
    target = tmp_path / "models" / "m.gguf"
    with pytest.raises(RuntimeError):
        driver.build_file(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError())),
                          lambda m: None)
    assert not target.exists() and not list(target.parent.iterdir())   # nothing half-written left behind
    assert driver.build_file(target, build, lambda m: None).read_text() == "done"
    driver.build_file(target, build, lambda m: None)
    assert len(calls) == 1


def test_source_key_follows_the_model_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    key = driver.source_key(tmp_path)
    assert driver.source_key(tmp_path) == key and key.startswith(f"{tmp_path.parent.name}-{tmp_path.name}-")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert driver.source_key(tmp_path) != key
