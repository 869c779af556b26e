"""One comparator for any two runners' outputs (Polygraphy's): the largest absolute error per shared output."""

from __future__ import annotations

import numpy as np

from edgevl.runtime.backends.tensors import to_host


def compare_outputs(a: dict, b: dict, atol: float, rtol: float = 0.0) -> dict:
    """Comparator: max abs error per output shared by two runners' results, and whether all pass.

    Values may be numpy arrays or DeviceTensors (copied to the host here)."""
    report = {}
    for name in a.keys() & b.keys():
        x, y = to_host(a[name]), to_host(b[name])
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        bound = atol + rtol * float(np.max(np.abs(y))) if y.size else atol
        report[name] = {"max_abs_error": err, "ok": err <= bound}
    return {"outputs": report, "ok": all(r["ok"] for r in report.values())}
