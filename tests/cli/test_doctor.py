"""`edgevl doctor` on a machine without a GPU: what it reports, as text and as JSON."""

from __future__ import annotations

import json

import pytest

from edgevl.runtime.backends import probe
from tests.cli import parse_command


HAS_GPU = bool(probe.gpus())


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_doctor_reports_no_gpu_here(capsys, tiny_artifact):
    from edgevl.cli.doctor import add_parser as add_doctor_parser
    args = parse_command(add_doctor_parser, ["doctor", str(tiny_artifact), "--max-context", "512"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "GPU           none usable: no NVIDIA driver here" in text
    assert "only the CPU backend will run" in text and "ort-cpu   works" in text
    assert "kv_cache" in text and probe.machine() in text
    args = parse_command(add_doctor_parser, ["doctor", "--json"])
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == [] and report["default_backend"] == "ort-cpu"
    assert report["backends"]["ort-cuda"]["ok"] is False
