"""Pure helpers over ONNX graphs: load/save, node groups, small rewrites, precision and size accounting.

Nothing here runs a model. The quantization passes (passes.py) and the report
(report.py) use these to find the parts of a graph that need care:

  groups      named sets of nodes found from the exporter's module-path metadata
              ("patch_embed", "merger", "lm_head"), kept at higher precision when
              measured error says so
  rewrites    Gemm -> MatMul (onnxruntime's dynamic and 4-bit quantizers only take
              MatMul), topological sort and Cast round-trip removal (the fp16
              converter appends its Casts at the end of the node list)
  accounting  precision per op type, bytes of MatMul weights, file sizes
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model


WEIGHT_OPS = ("MatMul", "Gemm")


# ----------------------------------------------------------------------------- files
def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The model with its external data (if any) read into memory."""
    return onnx.load(str(path), load_external_data=True)


def graph_precision(path: str | os.PathLike) -> str:
    """What a graph's weight matrices are stored as, read from its nodes and initializer types (weights not
    loaded): int4 if any MatMulNBits or 4-bit QMoE, int8 if any int8 weight, fp16 if its weights are fp16, else fp32."""
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    types = {t.data_type for t in model.graph.initializer}
    four_bit_experts = any(n.op_type == "QMoE" and {a.name: a.i for a in n.attribute}.get("expert_weight_bits", 4) == 4
                           for n in model.graph.node)
    if "MatMulNBits" in ops or four_bit_experts:
        return "int4"
    if types & {TensorProto.INT8, TensorProto.UINT8} or ops & _INT8_OPS:
        return "int8"
    return "fp16" if TensorProto.FLOAT16 in types else "fp32"


def with_shapes(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph with inferred shapes/types (value_info), weights loaded.

    Inference runs on the graph without its external weights (shapes need only the initializers'
    dims, and protobuf cannot serialize 2 GB), then the weights are read from beside the file.
    """
    path = Path(path)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    load_external_data_for_model(model, str(path.parent))
    return model


def graph_files(path: str | os.PathLike) -> list[Path]:
    """The graph file and its external-data file, when there is one."""
    path = Path(path)
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def file_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in graph_files(path))


# ----------------------------------------------------------------------------- node groups
def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node came from, e.g. 'blocks.0.attn.qkv' or 'merger.mlp.0' ('' = top level).

    The dynamo exporter writes `namespace` metadata: 'Graph/mod.a: Class/mod.a.b: Class/op: aten...';
    the segment before the last one names the innermost module.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    parts = meta.get("namespace", "").split("/")
    return parts[-2].split(":")[0].strip() if len(parts) >= 3 else ""


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes whose second input is a constant weight (the ones worth quantizing)."""
    inits = initializer_names(model)
    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def node_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Sensitive weight-node groups by name: the candidates for staying at higher precision.

    patch_embed  the MatMul that reads `pixel_values` (raw normalized pixels, wide range)
    merger       the patch merger MLP, whose output *is* the decoder's input embedding
    lm_head      the projection that produces `logits` (every error lands on the vocabulary)
    """
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    groups: dict[str, list[str]] = defaultdict(list)
    for node in weight_nodes(model):
        path = module_path(node)
        if (node.input[0] in graph_inputs and "pixel_values" in node.input[0]) or path.startswith("patch_embed"):
            groups["patch_embed"].append(node.name)
        elif path.startswith("merger"):
            groups["merger"].append(node.name)
        elif path.startswith("lm_head") or graph_outputs & set(node.output):
            groups["lm_head"].append(node.name)
    return dict(groups)


# ----------------------------------------------------------------------------- rewrites
def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite constant-weight Gemm (alpha = beta = 1, no transA) as MatMul [+ Add bias], in place.

    Gemm(A [M,K], B [N,K], transB=1) == MatMul(A, B^T [K,N]); onnxruntime's dynamic and
    MatMulNBits quantizers only handle MatMul. The node keeps its name and metadata.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)                               # [N, K] -> [K, N]
        name = f"{node.input[1]}_kn"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = f"{node.output[0]}_nobias" if has_bias else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], name], [out], name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before use (onnx.checker requires it), in place.

    Kahn's algorithm, O(nodes + edges); nodes that are already in order keep their order.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    missing = [{i for i in n.input if i not in available} for n in nodes]   # inputs still to be produced
    waiting: dict[str, list[int]] = defaultdict(list)
    for idx, names in enumerate(missing):
        for name in names:
            waiting[name].append(idx)
    ready = [idx for idx, names in enumerate(missing) if not names]     # a heap: smallest original index first
    heapq.heapify(ready)
    ordered, done = [], set()
    while ready:
        idx = heapq.heappop(ready)
        ordered.append(nodes[idx])
        done.add(idx)
        for out in nodes[idx].output:
            for user in waiting.pop(out, []):
                missing[user].discard(out)
                if not missing[user]:
                    heapq.heappush(ready, user)
    if len(ordered) != len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if i not in done)
        raise ValueError(f"graph has a cycle or a missing input near node {stuck.name!r}")
    del graph.node[:]
    graph.node.extend(ordered)


def drop_cast_round_trips(graph: onnx.GraphProto) -> int:
    """Remove Cast(fp32->fp16) -> Cast(fp16->fp32) pairs between two fp32 nodes, in place; returns how many.

    onnxruntime's fp16 converter casts every blocked node's output to fp16 and back at the
    next blocked node. Between two blocked nodes that round trip is lossy, and it overflows
    exactly where we keep nodes in fp32 *because* their values exceed the fp16 range.
    """
    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    inits = {t.name: t.data_type for t in graph.initializer}
    # The converter may leave fp16 value_info on initializers it kept fp32 (checker: type mismatch).
    stale = [v for v in graph.value_info if v.name in inits]
    for v in stale:
        graph.value_info.remove(v)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]} | inits
    rename, dropped = {}, []
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        up = producer.get(node.input[0])
        if types.get(node.input[0]) == TensorProto.FLOAT and node.input[0] in inits:
            rename[node.output[0]] = node.input[0]         # fp32 -> fp32 Cast of a weight kept fp32
            dropped.append(node)
        elif up is not None and cast_to(up) == TensorProto.FLOAT16 and types.get(up.input[0]) == TensorProto.FLOAT:
            rename[node.output[0]] = up.input[0]           # consumers read the fp32 original directly
            dropped.append(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in dropped:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | outputs
    unused_casts = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    for node in unused_casts:
        graph.node.remove(node)
    return len(dropped)


# ----------------------------------------------------------------------------- accounting
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_INT8_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


def precision_by_op(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{op_type: {precision: count}} for the compute nodes of a saved graph (Q/DQ plumbing left out).

    A node reading a DequantizeLinear of an int8 tensor runs in int8 after onnxruntime's QDQ
    fusion; MatMulNBits reports its bits; everything else reports its output's float type.
    """
    model = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is only for labels; fall back to declared types
        inferred = model
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    producer = {o: n for n in model.graph.node for o in n.output}
    counts: dict[str, Counter] = defaultdict(Counter)
    for node in model.graph.node:
        if node.op_type in _QUANT_OPS or node.op_type == "Cast":
            continue
        counts[node.op_type][_node_precision(node, producer, types)] += 1
    return {op: dict(c) for op, c in sorted(counts.items())}


def _node_precision(node, producer, types) -> str:
    if node.op_type in ("MatMulNBits", "QMoE"):
        attrs = {a.name: a.i for a in node.attribute}
        bits = attrs.get("bits", attrs.get("expert_weight_bits", 4))
        return f"int{bits}" + ("/int8-compute" if attrs.get("accuracy_level") == 4 else "")
    if node.op_type in _INT8_OPS:
        return "int8"
    if node.op_type in _QDQ_FUSED_OPS:   # onnxruntime fuses DQ -> op into an int8 kernel when both operands are DQ
        dqs = [producer.get(name) for name in node.input[:2]]
        if all(dq is not None and dq.op_type == "DequantizeLinear" and
               types.get(dq.input[0]) in (TensorProto.INT8, TensorProto.UINT8) for dq in dqs):
            return "int8"
    for name in [*node.output, *node.input]:
        if name in types and types[name] != TensorProto.UNDEFINED:
            return _TYPE_NAMES.get(types[name]) or helper.tensor_dtype_to_np_dtype(types[name]).name
    return "unknown"


_QDQ_FUSED_OPS = {"MatMul", "Gemm", "Conv"}
_TYPE_NAMES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def weight_table(model: onnx.ModelProto) -> list[dict]:
    """One row per constant-weight matrix product: node, op, precision, stored bytes, and fp32 bytes.

    Stored bytes count what the node reads: a plain float weight; a QDQ weight's int8 tensor,
    scales and zero points; a MatMulInteger's int8 weight and zero point; MatMulNBits' packed
    blocks, scales and zero points; a MoE node's expert weights (fc1, fc2) and a QMoE node's packed
    experts with their scales and zero points (one row per node). fp32 bytes are the same matrix at 4 bytes per element, so
    rows from a quantized graph compare with its fp32 source without matching node names.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def stored(name):
        t = inits.get(name)
        return (len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes) if t is not None else 0

    def numel(t):
        return int(np.prod(t.dims)) if t is not None else 0

    rows = []
    for node in model.graph.node:
        if node.op_type == "MoE" and node.input[2] in inits:
            t = inits[node.input[2]]
            precision = _TYPE_NAMES.get(t.data_type, "fp32")
            rows.append({"node": node.name, "op": node.op_type, "precision": precision,
                         "bytes": stored(node.input[2]) + stored(node.input[4]),
                         "fp32_bytes": 4 * (numel(t) + numel(inits.get(node.input[4])))})
        elif node.op_type == "QMoE":
            bits = next((a.i for a in node.attribute if a.name == "expert_weight_bits"), 4)
            parts = [node.input[i] for i in (2, 3, 5, 6, 11, 12) if i < len(node.input) and node.input[i]]
            rows.append({"node": node.name, "op": node.op_type, "precision": f"int{bits}",
                         "bytes": sum(stored(i) for i in parts),
                         "fp32_bytes": 4 * 8 // bits * sum(numel(inits.get(node.input[i])) for i in (2, 5))})
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            rows.append({"node": node.name, "op": node.op_type, "precision": f"int{attrs.get('bits', 4)}",
                         "bytes": sum(stored(i) for i in node.input[1:4] if i),
                         "fp32_bytes": 4 * attrs["K"] * attrs["N"]})
        elif node.op_type in (*WEIGHT_OPS, "MatMulInteger") and len(node.input) > 1:
            b = node.input[1]
            dq = producer.get(b)
            if b in inits:
                t = inits[b]
                precision = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}.get(t.data_type, "int8")
                extra = stored(node.input[3]) if node.op_type == "MatMulInteger" and len(node.input) > 3 else 0
                rows.append({"node": node.name, "op": node.op_type, "precision": precision,
                             "bytes": stored(b) + extra, "fp32_bytes": 4 * numel(t)})
            elif dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                rows.append({"node": node.name, "op": node.op_type, "precision": "int8",
                             "bytes": sum(stored(i) for i in dq.input if i),
                             "fp32_bytes": 4 * numel(inits[dq.input[0]])})
    return rows


def weight_summary(model: onnx.ModelProto) -> dict:
    """{precision: {"nodes", "bytes", "fp32_bytes", "ratio"}} over weight_table, plus "all"."""
    summary: dict[str, dict] = {}
    for row in weight_table(model):
        for key in (row["precision"], "all"):
            s = summary.setdefault(key, {"nodes": 0, "bytes": 0, "fp32_bytes": 0})
            s["nodes"] += 1
            s["bytes"] += row["bytes"]
            s["fp32_bytes"] += row["fp32_bytes"]
    for s in summary.values():
        s["ratio"] = s["bytes"] / s["fp32_bytes"] if s["fp32_bytes"] else 1.0
    return summary
