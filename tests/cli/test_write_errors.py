"""A write that fails (full disk, read-only or forbidden folder, file size limit) during export, quantize and triton:
one sentence naming the output and the reason, a non-zero exit, no traceback, and nothing half-written left behind.

Real failures come from RLIMIT_FSIZE in a subprocess (a write past it fails with EFBIG, as root too, where a
read-only chmod stops nothing); ENOSPC / EROFS / EACCES are raised in-process where the writers write."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.artifact import folder
from edgevl.artifact.folder import staged_folder
from edgevl.cli import main
from edgevl.errors import EdgevlError

ERRORS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
          errno.EACCES: "Permission denied"}


def _file_size_limit(limit: int = 100_000):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _one_sentence(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[", "Loading weights"))]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _nothing_left(parent: Path) -> None:
    assert list(parent.iterdir()) == [], list(parent.iterdir())


def _run_limited(*argv) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "edgevl", *map(str, argv)], capture_output=True, text=True,
                          preexec_fn=_file_size_limit(), timeout=300)
    return proc.returncode, proc.stderr


# ----------------------------------------------------------------------------- real failed writes
def test_export_past_the_file_size_limit(tiny_model_dir, tmp_path):
    out = tmp_path / "parent" / "out"
    code, err = _run_limited("export", tiny_model_dir, "-o", out)
    _one_sentence(code, err, f"{out} could not be written: File too large", "tokenizer.json -> ")
    _nothing_left(out.parent)


def test_triton_copy_past_the_file_size_limit(tiny_artifact, tmp_path):
    out = tmp_path / "repo"
    code, err = _run_limited("triton", tiny_artifact, "-o", out, "--copy")
    _one_sentence(code, err, f"{out} could not be written: File too large", "decoder.onnx -> ")
    _nothing_left(tmp_path)


def test_quantize_with_a_full_work_folder(tiny_artifact, tmp_path):
    out = tmp_path / "q"
    code, err = _run_limited("quantize", tiny_artifact, "-o", out, "--recipe", "fp16", "--samples", "2",
                             "--eval-samples", "1", "--new-tokens", "2", "--no-progress")
    _one_sentence(code, err, "the work folder of `edgevl quantize`", "could not be written: File too large")
    _nothing_left(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the in-process tests cover it)")
def test_a_read_only_parent_folder(tiny_model_dir, tiny_artifact, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        for argv in (["export", tiny_model_dir, "-o", parent / "out"], ["triton", tiny_artifact, "-o", parent / "r"]):
            _one_sentence(main([str(a) for a in argv]), capsys.readouterr().err, "could not be written",
                          "Permission denied")
        _nothing_left(parent)
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------- each reason, in-process
def _failing_write(path_of_args):
    """A stand-in for a writer: half a file where it writes, then the OSError its disk gives."""
    def write(*args, **kwargs):
        path = Path(path_of_args(args))
        path.write_bytes(b"half")
        raise OSError(write.errno, os.strerror(write.errno), str(path))
    return write


@pytest.mark.parametrize("number", ERRORS, ids=[errno.errorcode[n] for n in ERRORS])
def test_export_write_errors(tiny_model_dir, tmp_path, capsys, monkeypatch, number):
    from edgevl.export import exporter
    write = _failing_write(lambda args: args[1])            # export_vision(model, path, ...)
    write.errno = number
    monkeypatch.setattr(exporter, "export_vision", write)
    out = tmp_path / "out"
    code = main(["export", str(tiny_model_dir), "-o", str(out)])
    _one_sentence(code, capsys.readouterr().err, f"{out} could not be written: {ERRORS[number]}", "vision.onnx")
    _nothing_left(tmp_path)


@pytest.mark.parametrize("number", ERRORS, ids=[errno.errorcode[n] for n in ERRORS])
def test_quantize_write_errors(tiny_artifact, tmp_path, capsys, monkeypatch, number):
    from edgevl.calibrate import quantize
    write = _failing_write(lambda args: args[1])            # save_graph(model, path)
    write.errno = number
    monkeypatch.setattr(quantize, "save_graph", write)
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_artifact), "-o", str(out), "--recipe", "fp16", "--samples", "2",
                 "--eval-samples", "1", "--new-tokens", "2", "--no-progress"])
    _one_sentence(code, capsys.readouterr().err, f"{out} could not be written: {ERRORS[number]}")
    _nothing_left(tmp_path)


@pytest.mark.parametrize("number", ERRORS, ids=[errno.errorcode[n] for n in ERRORS])
def test_triton_write_errors(tiny_artifact, tmp_path, capsys, monkeypatch, number):
    from edgevl.serve.triton import repository
    write = _failing_write(lambda args: args[1])            # copyfile(src, dst)
    write.errno = number
    monkeypatch.setattr(repository.shutil, "copyfile", write)
    out = tmp_path / "r"
    code = main(["triton", str(tiny_artifact), "-o", str(out)])
    _one_sentence(code, capsys.readouterr().err, f"{out} could not be written: {ERRORS[number]}", "model.py")
    _nothing_left(tmp_path)


@pytest.mark.parametrize("number", ERRORS, ids=[errno.errorcode[n] for n in ERRORS])
def test_the_staged_folder_cannot_be_made(tmp_path, monkeypatch, number):
    def refuse(**kwargs):
        raise OSError(number, os.strerror(number), kwargs["dir"])
    monkeypatch.setattr(folder.tempfile, "mkdtemp", refuse)
    with pytest.raises(EdgevlError, match=f"{tmp_path / 'out'} could not be written: {ERRORS[number]} "
                                          f"\\({tmp_path}\\)"):
        with staged_folder(tmp_path / "out"):
            pytest.fail("the block must not run")
    _nothing_left(tmp_path)


def test_a_failed_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept").write_text("previous")
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".out.partial-"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self), str(target))
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(EdgevlError, match="could not be written: Permission denied"):
        with staged_folder(out, force=True) as tmp:
            (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "kept").read_text() == "previous"


def test_any_other_os_error_is_one_sentence(monkeypatch, capsys):
    from edgevl.cli import doctor

    def broken(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")
    monkeypatch.setattr(doctor, "run", broken)
    _one_sentence(main(["doctor"]), capsys.readouterr().err, "edgevl doctor: error: Permission denied (/some/file).")
    with pytest.raises(PermissionError):
        main(["--debug", "doctor"])
