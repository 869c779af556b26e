"""ort-cpu decode steps that read each KV head's cache once, not once per query head.

onnxruntime's CPU GroupQueryAttention computes every query head on its own, so a decode step of the 2B
(12 query heads over 2 KV heads) reads each KV head's cache 6 times. For ONE new token of ONE row, the g
query heads that share a KV head can go in as g *tokens* of a single head instead: the kernel then does one
[g, D] x [D, T] product per KV head. Those g "tokens" also write g copies of the new key and value, at
positions p .. p+g-1 (the cache keeps g-1 spare positions, and the next step overwrites them), and an
additive mask hides every position past p, so each query sees exactly positions 0..p, as the original does.

`rewrite(model)` wraps each GroupQueryAttention node in If(batch == 1, one new token and a cache buffer with
room for the copies, grouped, original).
onnxruntime runs an If branch on its caller's buffers, so past and present still share one buffer: nothing
is copied (checked on a 65536-position cache). Prefill, batches and every other backend run the node as
exported. `edgevl.runtime.backends.table` applies it to in-place decoders on ort-cpu only; the graph files on disk
stay as exported.
"""

from __future__ import annotations

from edgevl.artifact import names

OP = "GroupQueryAttention"
_PLAIN_INPUTS = 7          # query .. total_sequence_length: a node with rotary, bias or sinks is left alone


def _attrs(node) -> dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _candidates(model) -> list:
    """The GroupQueryAttention nodes this rewrite applies to: more query heads than KV heads, plain inputs."""
    found = []
    for node in model.graph.node:
        if node.op_type != OP or node.domain != "com.microsoft":
            continue
        a = _attrs(node)
        if (a.get("num_heads", 0) > a.get("kv_num_heads", 0) > 0 and len([i for i in node.input if i]) == _PLAIN_INPUTS
                and not a.get("do_rotary") and a.get("local_window_size", -1) == -1 and not a.get("softcap")):
            found.append(node)
    return found


def _grouping(model) -> tuple[list, int]:
    """(the candidate nodes, query heads per KV head) when every candidate has the same grouping and the cache
    input says its head_dim; ([], 1) otherwise: nothing to rewrite."""
    nodes = _candidates(model)
    groups = {_attrs(n)["num_heads"] // _attrs(n)["kv_num_heads"] for n in nodes}
    if len(groups) != 1 or not _cache_input(model)[1]:
        return [], 1
    return nodes, groups.pop()


def spare_positions(model) -> int:
    """Cache positions past the last real token that the rewritten graph writes: g - 1 (0: no rewrite)."""
    return _grouping(model)[1] - 1


def _cache_input(model):
    """(element type, head_dim) of the graph's first past key input; head_dim 0 when unknown (or no cache)."""
    past = next((i for i in model.graph.input if i.name == names.kv_names(1)[0][0]), None)
    if past is None or len(past.type.tensor_type.shape.dim) != 4:
        return 0, 0
    tensor = past.type.tensor_type
    return tensor.elem_type, tensor.shape.dim[3].dim_value


class _Nodes:
    """A node list with `add(op, inputs, **attrs) -> output name` (names under one prefix)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def add(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs):
        from onnx import helper
        out = [f"{self.prefix}{len(self.nodes)}_{op}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, out, domain=domain or None, **attrs))
        return out[0] if outputs == 1 else out

    def const(self, values, elem=None, scalar: bool = False) -> str:
        from onnx import TensorProto, helper
        elem = TensorProto.INT64 if elem is None else elem
        dims = [] if scalar else [len(values)]
        return self.add("Constant", [], value=helper.make_tensor("c", elem, dims, values))


def _branch(name: str, nodes: list, outputs: list[str], elem: int):
    from onnx import helper
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, elem, None) for o in outputs])


def _step_inputs(g: int, elem: int):
    """Graph-start nodes: the If condition (batch == 1 and one new token) and, for that case, the seqlens_k /
    total_sequence_length of g pseudo-tokens and the mask hiding positions past the real token."""
    from onnx import TensorProto, helper

    top = _Nodes("gd/")
    shape = top.add("Shape", [names.INPUTS_EMBEDS], end=2)                       # [B, S]
    one_step = top.add("Cast", [top.add("Equal", [shape, top.const([1, 1])])], to=TensorProto.INT32)
    # ... into a buffer with room for the copies: past and present one buffer (the runtime's cache with its
    # spare positions), not a past that present grows from (a replayed calibration feed).
    room = top.add("Cast", [top.add("Shape", [names.kv_names(1)[0][0]], start=2, end=3)], to=TensorProto.INT32)
    needed = top.add("Add", [top.add("Reshape", [names.TOTAL_SEQUENCE_LENGTH, top.const([1])]),
                             top.const([g - 1], TensorProto.INT32)])
    fits = top.add("Cast", [top.add("GreaterOrEqual", [room, needed])], to=TensorProto.INT32)
    flags = top.add("Concat", [one_step, fits], axis=0)
    cond = top.add("Cast", [top.add("ReduceMin", [flags], keepdims=0)], to=TensorProto.BOOL)

    step = _Nodes("gd/step/")
    extra = step.const([g - 1], TensorProto.INT32)
    seqlens = step.add("Add", [names.SEQLENS_K, extra])
    total = step.add("Add", [names.TOTAL_SEQUENCE_LENGTH, extra])
    positions = step.add("Range", [step.const([0], TensorProto.INT32, scalar=True), step.add(
        "Reshape", [total, step.const([])]), step.const([1], TensorProto.INT32, scalar=True)])
    hidden = step.add("Greater", [positions, names.SEQLENS_K])                  # past the real token
    row = step.add("Where", [hidden, step.const([float("-inf")], elem, scalar=True), step.const([0.0], elem, scalar=True)])
    bias = step.add("Expand", [step.add("Reshape", [row, step.const([1, 1, 1, -1])]),
                               step.add("Concat", [step.const([1, 1, g]), step.add(
                                   "Cast", [step.add("Reshape", [total, step.const([1])])], to=TensorProto.INT64)],
                                        axis=0)])
    outs = ["gd.seqlens", "gd.total", "gd.bias"]
    step.nodes += [helper.make_node("Identity", [v], [o]) for v, o in zip((seqlens, total, bias), outs)]
    # Not a step: values nobody reads (the If below takes the node as exported).
    other = _Nodes("gd/other/")
    other.nodes += [helper.make_node("Identity", [names.SEQLENS_K], ["gd.seqlens_"]),
                    helper.make_node("Identity", [names.TOTAL_SEQUENCE_LENGTH], ["gd.total_"]),
                    helper.make_node("Constant", [], ["gd.bias_"], value=helper.make_tensor("b", elem, [1, 1, 1, 1], [0.0]))]
    prepare = helper.make_node(
        "If", [cond], outs,
        then_branch=helper.make_graph(step.nodes, "gd_step", [], [
            helper.make_tensor_value_info("gd.seqlens", TensorProto.INT32, None),
            helper.make_tensor_value_info("gd.total", TensorProto.INT32, None),
            helper.make_tensor_value_info("gd.bias", elem, None)]),
        else_branch=helper.make_graph(other.nodes, "gd_other", [], [
            helper.make_tensor_value_info("gd.seqlens_", TensorProto.INT32, None),
            helper.make_tensor_value_info("gd.total_", TensorProto.INT32, None),
            helper.make_tensor_value_info("gd.bias_", elem, None)]))
    return top.nodes + [prepare], cond


def _wrapped(node, index: int, cond: str, g: int, head_dim: int, elem: int):
    """If(cond, the grouped form of `node`, `node` as exported), producing node's own outputs."""
    from onnx import helper

    a = _attrs(node)
    heads, kv = a["num_heads"], a["kv_num_heads"]
    q, k, v, past_k, past_v = node.input[:5]
    b = _Nodes(f"gd/{index}/")
    # query head h*g + j -> pseudo-token j, head h:  [1, 1, H*D] -> [kv, g, D] -> [g, kv, D] -> [1, g, kv*D]
    q_tokens = b.add("Reshape", [b.add("Transpose", [b.add("Reshape", [q, b.const([kv, g, head_dim])])], perm=[1, 0, 2]),
                                 b.const([1, g, kv * head_dim])])
    width = b.const([1, g, kv * head_dim])
    keep = {k_: val for k_, val in a.items() if k_ not in ("num_heads", "kv_num_heads")}
    out, present_k, present_v = b.add(
        OP, [q_tokens, b.add("Expand", [k, width]), b.add("Expand", [v, width]), past_k, past_v, "gd.seqlens",
             "gd.total", "", "", "", "gd.bias"], outputs=3, domain="com.microsoft", num_heads=kv, kv_num_heads=kv, **keep)
    merged = b.add("Reshape", [b.add("Transpose", [b.add("Reshape", [out, b.const([g, kv, head_dim])])], perm=[1, 0, 2]),
                               b.const([1, 1, heads * head_dim])])
    then_out = [merged, present_k, present_v]
    plain = helper.make_node(OP, list(node.input), [f"gd/{index}/plain_{i}" for i in range(3)], domain="com.microsoft",
                             **a)
    return helper.make_node(
        "If", [cond], list(node.output), name=f"{node.name or OP}_grouped_decode",
        then_branch=_branch(f"gd_{index}_grouped", b.nodes, then_out, elem),
        else_branch=_branch(f"gd_{index}_plain", [plain], list(plain.output), elem))


def rewrite(model) -> int:
    """Wrap every candidate node (see module doc) in the If, in place; returns spare_positions (0: unchanged)."""
    nodes, g = _grouping(model)
    if not nodes:
        return 0
    elem, head_dim = _cache_input(model)
    prepare, cond = _step_inputs(g, elem)
    body = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(prepare)
    for node in body:
        model.graph.node.append(_wrapped(node, nodes.index(node), cond, g, head_dim, elem) if node in nodes else node)
    return g - 1
