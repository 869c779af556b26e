"""Named backends: which runner class and settings run a graph.

`edgevl run --backend NAME` picks one of these. Each backend turns a graph path
into a Runner; the generation loop only ever sees Runners. GPU backends (issue:
ort-cuda, ort-trt, trt) are added here as entries, never as branches elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import EdgevlError
from edgevl.runtime.runners import OnnxrtRunner, Runner, SessionFromOnnx


@dataclass(frozen=True)
class OrtBackend:
    name: str
    providers: tuple[str, ...]
    description: str

    def make_runner(self, graph: Path, threads: int = 0) -> Runner:
        return OnnxrtRunner(SessionFromOnnx(graph, providers=self.providers, intra_op_threads=threads),
                            name=f"{self.name}:{Path(graph).stem}")


BACKENDS = {
    "ort-cpu": OrtBackend("ort-cpu", ("CPUExecutionProvider",), "ONNX Runtime on the CPU"),
}
DEFAULT_BACKEND = "ort-cpu"


def get_backend(name: str | None):
    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise EdgevlError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}.")
    return BACKENDS[name]
