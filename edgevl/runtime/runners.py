"""Loaders build inference sessions; runners execute them behind one interface.

Polygraphy's split: a *loader* is a callable that builds something expensive
(`SessionFromOnnx()` -> onnxruntime.InferenceSession), a *runner* owns it and
exposes

    activate()                      build / acquire resources
    infer(feed: dict) -> dict       name -> numpy array, both ways
    deactivate()                    release them
    input_metadata() -> dict        name -> TensorMeta(dtype, shape)

so the generation loop never knows which backend it drives, and one comparator
can check any two runners against each other. Backends other than ONNX Runtime on
the CPU are added as new runner classes; optional packages are imported lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgevl.errors import EdgevlError


@dataclass(frozen=True)
class TensorMeta:
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, strings for symbolic ones


class Runner(Protocol):
    name: str

    def activate(self) -> None: ...
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def deactivate(self) -> None: ...
    def input_metadata(self) -> dict[str, TensorMeta]: ...


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class SessionFromOnnx:
    """Loader: builds an onnxruntime.InferenceSession for one graph."""

    def __init__(self, path: str | os.PathLike, providers=("CPUExecutionProvider",), intra_op_threads: int = 0,
                 optimization_level: str = "all"):
        self.path = Path(path)
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.optimization_level = optimization_level

    def __call__(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.log_severity_level = 3  # errors only: the function-inlining notices are noise to users
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization_level]
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise EdgevlError(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} "
                              f"(available: {', '.join(ort.get_available_providers())}).")
        try:
            return ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as e:  # a corrupt or foreign graph: one sentence, not an ORT stack
            raise EdgevlError(f"onnxruntime could not load {self.path.name}: {str(e).splitlines()[0]}") from None


class OnnxrtRunner:
    """Runs an onnxruntime.InferenceSession built by a loader."""

    def __init__(self, build_session: Callable, name: str = "onnxrt"):
        self.build_session = build_session
        self.name = name
        self.session = None

    def activate(self) -> None:
        if self.session is None:
            self.session = self.build_session()

    def deactivate(self) -> None:
        self.session = None

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def input_metadata(self) -> dict[str, TensorMeta]:
        self._require_active()
        return {i.name: TensorMeta(np.dtype(_ORT_TYPES[i.type]), tuple(i.shape)) for i in self.session.get_inputs()}

    def output_names(self) -> list[str]:
        self._require_active()
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        outputs = self.session.run(None, feed)
        return dict(zip(self.output_names(), outputs))

    def _require_active(self) -> None:
        if self.session is None:
            raise RuntimeError(f"runner {self.name} used before activate()")


def compare_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float, rtol: float = 0.0) -> dict:
    """Comparator: max abs error per output shared by two runners' results, and whether all pass."""
    report = {}
    for name in a.keys() & b.keys():
        err = float(np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)))) if a[name].size else 0.0
        bound = atol + rtol * float(np.max(np.abs(b[name]))) if b[name].size else atol
        report[name] = {"max_abs_error": err, "ok": err <= bound}
    return {"outputs": report, "ok": all(r["ok"] for r in report.values())}
