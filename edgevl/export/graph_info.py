"""What a saved graph looks like from outside: its I/O as the manifest records it, its MRoPE nodes.

onnx only (no torch), so the exporter and `edgevl quantize` describe graphs the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

MROPE_DOMAIN = "edgevl"
MROPE_OP = "MRoPE"


def count_mrope_nodes(model: onnx.ModelProto) -> int:
    """MRoPE nodes in the main graph (a saved model must keep them, not an inlined body)."""
    return sum(1 for n in model.graph.node if n.domain == MROPE_DOMAIN and n.op_type == MROPE_OP)


def describe_graph(path: str | os.PathLike) -> dict:
    """The manifest's `graphs` entry: file, inputs/outputs (name, dtype, dims: ints or symbolic names)."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"file": Path(path).name, "inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "mrope_nodes": count_mrope_nodes(model)}
