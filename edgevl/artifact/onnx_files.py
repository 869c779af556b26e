"""ONNX files of an artifact: saving a graph (weights beside it past a size) and describing one as a GraphSpec.

Needs the `onnx` package (the export and quantize extras); the torch-free runtime never imports this.
The exporter saves onnx_ir models, `edgevl quantize` and the TensorRT inliner save ModelProtos: both go
through `save_graph`, so every graph of every artifact is laid out and checked the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgevl.artifact import names
from edgevl.artifact.folder import EXTERNAL_DATA_MIN_BYTES
from edgevl.artifact.manifest import ArrayRef, EmbeddingSpec, GraphSpec, TensorSpec

# onnx.checker's full check (shape inference included) re-serializes the model, and one protobuf caps at
# 2 GB: graphs with more weight bytes than this get the structural check only. onnxruntime's quantizers
# need use_external_data_format past the same size.
FULL_CHECK_MAX_BYTES = 1 << 30


def weight_bytes(model) -> int:
    """Bytes of a graph's initializers (an onnx.ModelProto or an onnx_ir.Model)."""
    if isinstance(model, onnx.ModelProto):
        return sum(len(t.raw_data) for t in model.graph.initializer)
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_graph(model, path: str | os.PathLike, check: bool = True) -> Path:
    """Write `model` to `path`; past EXTERNAL_DATA_MIN_BYTES its weights go to `<name>.data` beside it
    (onnxruntime memory-maps that instead of parsing protobuf). Runs onnx.checker unless `check` is off."""
    path = Path(path)
    size = weight_bytes(model)
    location = f"{path.name}.data" if size > EXTERNAL_DATA_MIN_BYTES else None
    if isinstance(model, onnx.ModelProto):
        onnx.save_model(model, str(path), save_as_external_data=location is not None, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        import onnx_ir as ir
        ir.save(model, path, external_data=location)
    if check:
        onnx.checker.check_model(str(path), full_check=size <= FULL_CHECK_MAX_BYTES)
    return path


def is_large(path: str | os.PathLike) -> bool:
    """Whether a saved graph is past FULL_CHECK_MAX_BYTES (its files together)."""
    path = Path(path)
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists()) \
        > FULL_CHECK_MAX_BYTES


def external_files(model: onnx.ModelProto) -> tuple[str, ...]:
    """The external-data files a graph's initializers point at, as written in the graph."""
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return tuple(sorted(files))


def custom_ops(model: onnx.ModelProto) -> tuple[str, ...]:
    """'<domain>.<op>' of the edgevl-domain nodes in the main graph (a saved graph keeps them, not a body)."""
    return tuple(sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain == names.EDGEVL_DOMAIN}))


def tensor_specs(values) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                            tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
                 for v in values)


def describe_graph(path: str | os.PathLike, kind: str, precision: str, variant: str = "ort",
                   kv_cache: str | None = None) -> GraphSpec:
    """The GraphSpec of a saved graph: its file, external data, custom ops and I/O (read from the graph)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(kind=kind, file=path.name, inputs=tensor_specs(model.graph.input),
                     outputs=tensor_specs(model.graph.output), precision=precision,
                     data_files=external_files(model), custom_ops=custom_ops(model), variant=variant,
                     kv_cache=kv_cache, opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


# ----------------------------------------------------------------------------- the embedding table
def external_ref(tensor: onnx.TensorProto) -> ArrayRef | None:
    """Where an initializer's bytes lie in its external-data file, or None when it is stored inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
    return ArrayRef(info["location"], int(info.get("offset", 0)), dtype, tuple(tensor.dims))


def lm_head(path: str | os.PathLike) -> tuple[onnx.NodeProto, dict[str, ArrayRef | None]]:
    """The decoder's lm_head (the node that produces `logits`) and where its constant inputs lie."""
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if names.LOGITS in n.output)
    inits = {t.name: t for t in model.graph.initializer}
    return node, {name: external_ref(inits[name]) for name in node.input if name in inits}


def attribute(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def write_npy(folder: Path, name: str, array) -> ArrayRef:
    """Save an array as `name` (.npy) in `folder`, in slices (a 7B table is 2 GB); where its data lies."""
    import numpy as np
    out = np.lib.format.open_memmap(Path(folder) / name, mode="w+", dtype=array.dtype, shape=array.shape)
    for start in range(0, len(array), 16384):
        out[start:start + 16384] = array[start:start + 16384]
    out.flush()
    ref = ArrayRef(name, int(out.offset), out.dtype.name, tuple(out.shape))
    del out
    return ref


def tied_dense_table(folder: Path, decoder_file: str, table) -> EmbeddingSpec | None:
    """The embedding table as a view of the decoder's own lm_head weight (tied embeddings: one copy on disk),
    when that weight is a dense [vocab, hidden] matrix in the decoder's external data equal to `table`."""
    import numpy as np
    node, refs = lm_head(Path(folder) / decoder_file)
    if node.op_type != "Gemm" or not attribute(node, "transB", 0) or len(node.input) < 2:
        return None
    ref = refs.get(node.input[1])
    if ref is None or ref.shape != tuple(table.shape) or ref.dtype != table.dtype.name:
        return None
    stored = np.memmap(Path(folder) / ref.file, dtype=ref.dtype, mode="r", offset=ref.offset, shape=ref.shape)
    if not all(np.array_equal(stored[i:i + 16384], table[i:i + 16384]) for i in range(0, len(table), 16384)):
        return None
    return EmbeddingSpec("dense", ref, vocab=table.shape[0], hidden=table.shape[1], tied=True)
