"""Peak memory measured in a fresh process: it resets its peak RSS (Linux's /proc/self/clear_refs) once what it needs
is loaded and reports how far it rose above that baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


NEEDS_PEAK_RESET = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                      reason="needs Linux's peak-RSS reset")
MB = 1 << 20
MEASURE = """
import json, os, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset():
    open("/proc/self/clear_refs", "w").write("5")     # VmHWM := VmRSS
    return status("VmRSS")
def report(**values):
    print("MEASURED " + json.dumps(values), flush=True)
"""


def measure(script: str, *args: str, timeout: int = 120) -> dict:
    """Run MEASURE + script in a fresh interpreter; the dict it reported."""
    proc = subprocess.run([sys.executable, "-c", MEASURE + script, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEASURED ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("MEASURED "))
