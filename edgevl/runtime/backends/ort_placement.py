"""onnxruntime's CUDA EP, predicted from a graph on any machine: which nodes have a CUDA kernel for their element
types, which nodes it runs on the CPU, and where a value crosses between host and device on every run.

Why: onnxruntime-gpu never fails on a node whose types have no CUDA kernel; it runs that node on the CPU and
copies its inputs and outputs both ways each run (an fp32 GroupQueryAttention: the whole KV cache, per layer, per
step). And it moves shape arithmetic to the CPU on purpose: a node fed only by `Shape` outputs, small constants
and graph inputs runs there. That is harmless while such values only reach inputs the CUDA kernels read from host
memory anyway (Reshape's shape, Slice's starts, ...); a host value feeding a GPU node's data is a Memcpy node,
which rules out CUDA graphs (`ort-cuda --cuda-graph`). All of that shows in the graph, so `ort-cuda` checks a
graph before it makes its session (`check_for_cuda`) and tests/runtime/backends/test_ort_placement.py lints every
exported `ort` graph.

`session.disable_cpu_ep_fallback` cannot replace this check: the CUDA EP hands its shape-arithmetic nodes to the
CPU EP itself (GetCapability drops GetCpuPreferredNodes' result), so the entry refuses any graph with a `Shape`
chain, harmless or not (onnxruntime/core/session/inference_session.cc: "This session contains graph nodes that are
assigned to the default CPU EP"). `ort-cuda` sets it only where this prediction puts no node on the CPU.

Sources, onnxruntime 1.31.1 (what `pip install onnxruntime-gpu` gives for CUDA 13):
- CUDA_TYPES: the kernel classes compiled into onnxruntime-gpu 1.31.1's capi/libonnxruntime_providers_cuda.so,
  read from their RTTI names (`strings -n 8 libonnxruntime_providers_cuda.so | grep '^N11onnxruntime'`): e.g.
  GroupQueryAttention<MLFloat16|BFloat16, ...> and no float one; MultiHeadAttention<float|MLFloat16|BFloat16, ...>;
  no DynamicQuantizeLinear, DynamicQuantizeMatMul or MatMulIntegerToFloat at all; MatMulInteger<int8, int8> only.
- CPU_INPUTS: `.InputMemoryType(OrtMemTypeCPUInput, i)` in the CUDA kernel registrations under
  onnxruntime/core/providers/cuda/ and contrib_ops/cuda/ (read through a code index whose snapshots are not tied to
  a release tag: reshape.cc@0cccd81, expand.cc@086afaa, squeeze.cc@be03a8b, unsqueeze.cc@044f3d7,
  contrib_ops/cuda/bert/group_query_attention.cc@001d12d; the rest as registered since opset 13, 2021).
- the placement rule: GetCpuPreferredNodes, onnxruntime/core/framework/fallback_cpu_capability.cc@039e489.
None of it has been compared with a session on a real GPU yet.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from edgevl.artifact import names

MS = "com.microsoft"
# onnx.TensorProto element types (stable numbers; onnx itself is imported only where a graph is read)
ELEMENT_TYPES = {1: "float", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                 11: "double", 12: "uint32", 13: "uint64", 16: "bfloat16", 17: "float8e4m3fn", 18: "float8e4m3fnuz",
                 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4"}
F32, U8, I8, I16, I32, I64, BOOL, F16, F64, U32, U64, BF16 = 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 16
F8E4M3FN, F8E4M3FNUZ, F8E5M2, F8E5M2FNUZ, U4, I4 = 17, 18, 19, 20, 21, 22
ANY = None                                                     # every fixed-size type (data movement ops)
FLOATS = frozenset({F32, F64, F16, BF16})
NUMBERS = FLOATS | {I32, I64, U32, U64}
NONE = frozenset()                                             # no CUDA kernel at all

# (domain, op) -> (the input whose element type picks the kernel, the types a CUDA kernel exists for)
CUDA_TYPES: dict[tuple[str, str], tuple[int, frozenset | None]] = {
    **{("", op): (0, ANY) for op in (
        "Shape", "Size", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Concat", "Split", "Slice",
        "Gather", "GatherElements", "GatherND", "Expand", "Transpose", "Tile", "Cast", "CastLike", "ConstantOfShape")},
    **{("", op): (0, NUMBERS) for op in ("Add", "Sub", "Mul", "Div", "Min", "Max")},
    **{("", op): (0, FLOATS) for op in (
        "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Sigmoid", "Tanh", "Cos", "Sin", "MatMul", "Gemm",
        "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "LayerNormalization", "SimplifiedLayerNormalization",
        "Attention", "RotaryEmbedding", "Gelu")},
    ("", "Pow"): (0, frozenset({F32, F64, F16, I32, I64})),
    ("", "ArgMax"): (0, frozenset({F32, F64, F16})),
    ("", "CumSum"): (0, frozenset({F32, F64, F16, I32, I64, U32, U64})),
    ("", "Range"): (0, frozenset({F32, F64, I32, I64, I16})),
    **{("", op): (0, frozenset({F32, F64, F16, I32, I64, U32, U64, BOOL})) for op in (
        "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")},
    **{("", op): (0, frozenset({BOOL})) for op in ("And", "Or", "Not")},
    ("", "Where"): (1, frozenset({U8, I32, I64, F32, F64, F16, BF16})),
    ("", "QuantizeLinear"): (0, frozenset({F32, F16})),
    ("", "DequantizeLinear"): (0, frozenset({I8, U8, I4, U4, F8E4M3FN, F8E5M2})),
    ("", "MatMulInteger"): (0, frozenset({I8})),
    ("", "DynamicQuantizeLinear"): (0, NONE),
    (MS, "GroupQueryAttention"): (0, frozenset({F16, BF16})),
    (MS, "MultiHeadAttention"): (0, frozenset({F32, F16, BF16})),
    # FastGelu<float|MLFloat16>: contrib_ops/cuda/cuda_contrib_kernels.cc (read through the code index, not the .so)
    (MS, "FastGelu"): (0, frozenset({F32, F16})),
    (MS, "RotaryEmbedding"): (0, frozenset({F32, F16, BF16})),
    (MS, "MatMulNBits"): (0, frozenset({F32, F16, BF16})),
    (MS, "SkipSimplifiedLayerNormalization"): (0, frozenset({F32, F16, BF16})),
    (MS, "GatherBlockQuantized"): (0, frozenset({U8, I4, U4})),
    (MS, "DynamicQuantizeMatMul"): (0, NONE),
    (MS, "MatMulIntegerToFloat"): (0, NONE),
}

# (domain, op) -> inputs the CUDA kernel reads from host memory (OrtMemTypeCPUInput): a host value there is no copy.
CPU_INPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "Reshape"): frozenset({1}), ("", "Expand"): frozenset({1}), ("", "ConstantOfShape"): frozenset({0}),
    ("", "Slice"): frozenset({1, 2, 3, 4}), ("", "Squeeze"): frozenset({1}), ("", "Unsqueeze"): frozenset({1}),
    ("", "Range"): frozenset({0, 1, 2}), ("", "Tile"): frozenset({1}), ("", "TopK"): frozenset({1}),
    ("", "CumSum"): frozenset({1}), ("", "Split"): frozenset({1}), ("", "Pad"): frozenset({1, 2, 3}),
    ("", "Resize"): frozenset({1, 2, 3}), ("", "Upsample"): frozenset({1}), ("", "Clip"): frozenset({1, 2}),
    ("", "OneHot"): frozenset({1}), ("", "Trilu"): frozenset({1}), ("", "If"): frozenset({0}),
    ("", "Loop"): frozenset({0, 1}), ("", "Dropout"): frozenset({1, 2}),
    **{("", op): frozenset({1}) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                            "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                            "ReduceSumSquare")},
    (MS, "GroupQueryAttention"): frozenset({6}),               # total_sequence_length
}
CPU_OUTPUTS: dict[tuple[str, str], frozenset[int]] = {("", "Shape"): frozenset({0}), ("", "Size"): frozenset({0})}
SMALL_INITIALIZER = 100          # kSmallInitializerThreshold: elements of an initializer the CPU may read freely
NO_CPU_PLACEMENT = frozenset({F16, BF16, F8E4M3FN, F8E4M3FNUZ, F8E5M2, F8E5M2FNUZ})
HOST_INPUTS = (names.TOTAL_SEQUENCE_LENGTH,)   # graph inputs the runtime binds in host memory (backends/ort.py)


@dataclass(frozen=True)
class NoKernel:
    """A node whose element type has no CUDA kernel (or whose op this table does not know: types None)."""

    node: str
    op: str
    dtype: str
    types: tuple[str, ...] | None


@dataclass(frozen=True)
class Crossing:
    """A value that moves between host and device on every run: a Memcpy node onnxruntime inserts."""

    value: str
    producer: str                # the node that makes it ("" for a graph input)
    consumer: str
    op: str                      # the consumer's
    input_index: int
    to_device: bool              # host -> device (else device -> host)


@dataclass(frozen=True)
class Placement:
    cpu_nodes: tuple[str, ...]               # every node onnxruntime would run on the CPU
    no_kernel: tuple[NoKernel, ...]
    unknown: tuple[NoKernel, ...]            # ops missing from CUDA_TYPES (not judged)
    crossings: tuple[Crossing, ...]

    @property
    def clean(self) -> bool:
        """Every node has a kernel and nothing crosses between host and device inside a run."""
        return not (self.no_kernel or self.unknown or self.crossings)


def type_name(elem: int | None) -> str:
    return "unknown" if elem is None else ELEMENT_TYPES.get(elem, f"type {elem}")


# ----------------------------------------------------------------------------- element types
def _attr(node, name: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


_BOOL_OUT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}
_INT64_OUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def _output_types(node, types: dict[str, int]) -> list[int | None]:
    """Element types of a node's outputs from its inputs' (the rules of the ops edgevl's graphs use)."""
    ins = [types.get(i) if i else None for i in node.input]
    op, n = node.op_type, len(node.output)
    if op == "Constant":
        value = _attr(node, "value")
        return [value.data_type if value is not None else (I64 if _attr(node, "value_ints") is not None else F32)]
    if op == "Cast":
        return [_attr(node, "to")]
    if op in _BOOL_OUT:
        return [BOOL] * n
    if op in _INT64_OUT:
        return [I64] * n
    if op == "ConstantOfShape":
        value = _attr(node, "value")
        return [value.data_type if value is not None else F32]
    if op == "DynamicQuantizeLinear":
        return [U8, F32, U8]
    if op == "MatMulInteger":
        return [I32]
    if op == "QuantizeLinear":
        return [_attr(node, "output_dtype") or (ins[2] if len(ins) > 2 and ins[2] else U8)]
    if op in ("DequantizeLinear", "CastLike", "Where"):
        return [ins[1]] * n
    if op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "GatherBlockQuantized"):
        return [ins[2]] * n
    if op == "TopK":
        return [ins[0], I64]
    first = next((t for t in ins if t is not None), None)
    return [first] * n


def element_types(graph) -> dict[str, int | None]:
    """Element type of every value of a (topologically sorted) graph."""
    types: dict[str, int | None] = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        for name, elem in zip(node.output, _output_types(node, types)):
            types[name] = elem
    return types


# ----------------------------------------------------------------------------- placement
def _key(node) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def _has_kernel(node, types) -> tuple[bool | None, int | None]:
    """(True / False / None = op unknown here, the element type that decided)."""
    entry = CUDA_TYPES.get(_key(node))
    if entry is None:
        return None, None
    index, allowed = entry
    dtype = types.get(node.input[index]) if index < len(node.input) and node.input[index] else None
    return (allowed is ANY or dtype in allowed), dtype


def _fold_constants(model, all_nodes: list) -> tuple[set[int], set[str]]:
    """onnxruntime's constant folding before partitioning: (nodes computed at load, the small constant values).

    A node whose inputs are all constants (initializers, Constant outputs, folded values), or a Shape of a value
    with a static shape, is computed once when the session is made; it never runs. A constant of at most
    SMALL_INITIALIZER elements may be read by a CPU node freely (IsSmallInitializer)."""
    import numpy as np
    from onnx import shape_inference
    shapes = {}
    try:
        inferred = shape_inference.infer_shapes(model).graph
        for v in (*inferred.value_info, *inferred.input, *inferred.output):
            dims = v.type.tensor_type.shape.dim
            if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                shapes[v.name] = [d.dim_value for d in dims]
    except Exception:  # contrib ops the checker does not know: fold from initializers alone
        pass
    graph = model.graph
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    const = {t.name for t in graph.initializer}
    folded: set[int] = set()
    for node in all_nodes:
        inputs = [i for i in node.input if i]
        static_shape = node.op_type == "Shape" and node.input[0] in shapes
        if node.op_type == "Constant" or static_shape or (inputs and all(i in const for i in inputs)):
            folded.add(id(node))
            const.update(node.output)
            if node.op_type == "Constant":
                value = _attr(node, "value")
                shapes[node.output[0]] = list(value.dims) if value is not None else []
    small = {name for name in const if name in shapes and int(np.prod(shapes[name], dtype=np.int64)) <= SMALL_INITIALIZER}
    return folded, small


def place(model, host_inputs: tuple[str, ...] = HOST_INPUTS) -> Placement:
    """Where onnxruntime's CUDA EP (with the CPU EP beside it) runs each node of `model` (model-local functions are
    inlined first, as onnxruntime does), and what that costs."""
    from onnx import inliner
    model = inliner.inline_local_functions(model) if model.functions else model
    graph = model.graph
    all_nodes = list(graph.node)        # one wrapper per node: ids stay valid while the list lives
    folded, small = _fold_constants(model, all_nodes)
    nodes = [n for n in all_nodes if id(n) not in folded]
    order = {id(n): i for i, n in enumerate(nodes)}
    types = element_types(graph)
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    no_kernel, unknown, cuda = [], [], set()
    for n in nodes:
        ok, dtype = _has_kernel(n, types)
        if ok:
            cuda.add(id(n))
        else:
            allowed = CUDA_TYPES.get(_key(n), (0, None))[1]
            issue = NoKernel(n.name, n.op_type, type_name(dtype),
                             None if ok is None else tuple(sorted(type_name(t) for t in allowed)))
            (unknown if ok is None else no_kernel).append(issue)
    cpu = _cpu_preferred(nodes, order, cuda, types, consumers, small,
                         {v.name for v in graph.input} - {t.name for t in graph.initializer})
    on_cpu = cpu | {id(n) for n in nodes if id(n) not in cuda}
    graph_inputs = {v.name for v in graph.input}
    crossings = _crossings(nodes, on_cpu, graph_inputs, set(host_inputs))
    return Placement(tuple(n.name for n in nodes if id(n) in on_cpu), tuple(no_kernel), tuple(unknown),
                     tuple(crossings))


def _cpu_preferred(nodes, order, cuda, types, consumers, small, graph_inputs) -> set[int]:
    """GetCpuPreferredNodes: from the consumers of CUDA kernels' host outputs (Shape, Size), every node whose inputs
    are all host values, small constants or graph inputs, and that reads no host value as a host input of its own
    kernel, moves to the CPU (and its consumers become candidates); nodes with no CUDA kernel are on the CPU."""
    host_values: set[str] = set()
    heap: list[tuple[int, int]] = []
    by_id = {id(n): n for n in nodes}

    def push_consumers(node):
        for name in node.output:
            for c in consumers.get(name, ()):
                heapq.heappush(heap, (order[id(c)], id(c)))

    for n in nodes:
        if id(n) in cuda:
            for i, name in enumerate(n.output):
                if i in CPU_OUTPUTS.get(_key(n), ()):
                    host_values.add(name)
                    for c in consumers.get(name, ()):
                        heapq.heappush(heap, (order[id(c)], id(c)))
    cpu, seen = set(), set()
    while heap:
        _, ident = heapq.heappop(heap)
        if ident in seen:
            continue
        seen.add(ident)
        node = by_id[ident]
        if ident not in cuda:                     # no CUDA kernel: on the CPU, its outputs host values
            host_values.update(node.output)
            push_consumers(node)
            continue
        if _prefers_cpu(node, types, small, graph_inputs, host_values):
            cpu.add(ident)
            host_values.update(node.output)
            push_consumers(node)
    return cpu


def _prefers_cpu(node, types, small, graph_inputs, host_values) -> bool:
    cpu_inputs = CPU_INPUTS.get(_key(node), frozenset())
    for i, name in enumerate(node.input):
        if types.get(name) in NO_CPU_PLACEMENT:
            return False
        if name in small or name in graph_inputs:
            continue
        if name not in host_values or i in cpu_inputs:
            return False
    return True


def _crossings(nodes, on_cpu: set[int], graph_inputs: set[str], host_inputs: set[str]) -> list[Crossing]:
    """Values read on the other side of where they were made: host values in a GPU node's device inputs, device
    values (GPU nodes' outputs but Shape's, inputs bound on the device) in a CPU node."""
    host = set(host_inputs)
    device = graph_inputs - host_inputs
    producer = {}
    for n in nodes:
        cpu_out = CPU_OUTPUTS.get(_key(n), frozenset()) if id(n) not in on_cpu else frozenset(range(len(n.output)))
        for i, name in enumerate(n.output):
            (host if i in cpu_out else device).add(name)
            producer[name] = n.name
    out = []
    for n in nodes:
        cpu_inputs = CPU_INPUTS.get(_key(n), frozenset())
        for i, name in enumerate(n.input):
            if id(n) in on_cpu and name in device:
                out.append(Crossing(name, producer.get(name, ""), n.name, n.op_type, i, to_device=False))
            elif id(n) not in on_cpu and name in host and i not in cpu_inputs:
                out.append(Crossing(name, producer.get(name, ""), n.name, n.op_type, i, to_device=True))
    return out


# ----------------------------------------------------------------------------- what ort-cuda does with it
def refusal(graph_file: str, folder: str, precision: str, placement: Placement) -> str | None:
    """One sentence for a graph with nodes onnxruntime's CUDA EP would run on the CPU for want of a kernel, or None.

    graph_file: the graph's name; folder: its artifact folder (for the command); precision: GraphSpec.precision."""
    if not placement.no_kernel:
        return None
    counts: dict[tuple[str, str], int] = {}
    for k in placement.no_kernel:
        counts[(k.op, k.dtype)] = counts.get((k.op, k.dtype), 0) + 1
    listed = ", ".join(f"{op} on {dtype} ({n} node{'s' if n > 1 else ''})" for (op, dtype), n in counts.items())
    ops = {op for op, _ in counts}
    head = (f"{graph_file}: onnxruntime's CUDA EP has no kernel for {listed}, so those nodes would run on the CPU "
            f"and copy their inputs and outputs between host and device at every step")
    fp16 = (f"edgevl quantize {folder} -o {folder}-fp16 --recipe fp16" if precision == "fp32" else
            "edgevl quantize <the fp32 export> -o <folder> --recipe fp16")
    if "GroupQueryAttention" in ops:
        return (f"{head}. This {precision} artifact's attention has no CUDA kernel (GroupQueryAttention runs in float16 "
                f"or bfloat16 only); make an fp16 artifact for ort-cuda: {fp16} (or run this one on ort-cpu).")
    if ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}:
        return (f"{head}. Dynamically quantized int8 activations are onnxruntime's CPU path: run this artifact on "
                f"ort-cpu, or make an fp16 artifact for ort-cuda: {fp16}.")
    return f"{head}. Run this artifact on ort-cpu, or make an fp16 artifact for ort-cuda: {fp16}."


def check_for_cuda(path, folder: str, precision: str) -> Placement:
    """The predicted placement of the graph at `path` on ort-cuda; EdgevlError (refusal()) when a node has no CUDA
    kernel for its element type. Reads the graph without its weights."""
    import onnx

    from edgevl.errors import EdgevlError
    placement = place(onnx.load(str(path), load_external_data=False))
    sentence = refusal(str(getattr(path, "name", path)), folder, precision, placement)
    if sentence:
        raise EdgevlError(sentence)
    return placement
