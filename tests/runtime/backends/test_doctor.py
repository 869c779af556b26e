"""runtime/backends/doctor.py and the modules it probes import without the heavy packages (aarch64-safe)."""

from __future__ import annotations

import subprocess
import sys


def test_backend_modules_import_without_heavy_packages():
    """aarch64-safe imports: no torch, transformers, onnx, tensorrt or cuda-python needed to load or probe."""
    script = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'onnx', 'tensorrt', 'cuda', 'cuda.bindings'):\n"
        "    sys.modules[m] = None\n"
        "from edgevl.runtime.backends import table, doctor, trt, sizing, probe\n"
        "import edgevl.cli\n"
        "report = doctor.collect()\n"
        "assert report['backends']['ort-cpu']['ok'], report\n"
        "assert not report['backends']['trt']['ok'] and not report['backends']['ort-trt']['ok']\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
