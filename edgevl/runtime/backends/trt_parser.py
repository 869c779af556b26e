"""Which ONNX ops (and key attributes) each TensorRT version's ONNX parser takes, and a check of a graph against it.

From onnx-tensorrt: docs/operators.md of the 10.1-GA release branch (TensorRT 10.0/10.1: 150 ops marked Y,
"opset 9 to opset 20"), its docs/Changelog.md for what each 10.x release added or relaxed, and docs/operators.md
as of 10.15 ("opset 9 to opset 24"; Attention, RotaryEmbedding, RMSNormalization with their restrictions). No
operators.md of a TensorRT 11 release was read: 11.x is taken to parse what 10.16 parses (its Python API has the
matching network layers: add_attention, add_rotary_embedding, add_normalization_v2). Nothing here ran TensorRT.

Used by `trt` before it builds (a sentence instead of the parser's error) and by
tests/runtime/backends/test_trt_parser.py on every exported `standard` graph at each opset the docs offer (23 by
default, 18 for JetPack 6's TensorRT 10.3).
"""

from __future__ import annotations

from dataclasses import dataclass

# ops marked Y in onnx-tensorrt 10.1-GA docs/operators.md (TensorRT 10.0 / 10.1)
BASE_10_0 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor""".split())

# (major, minor) -> ops that release's parser added (Changelog.md)
ADDED = {(10, 4): frozenset({"BlackmanWindow", "HammingWindow", "HannWindow"}), (10, 5): frozenset({"STFT"}),
         (10, 14): frozenset({"Attention"}), (10, 15): frozenset({"RotaryEmbedding", "RMSNormalization", "TensorScatter"})}
# (major, minor) from which the parser takes models up to this default-domain opset: operators.md headers (10.0: 20,
# 10.15: 24); 10.14 parses Attention, which exists from opset 23 only, hence 23 there
MAX_OPSET = {(10, 0): 20, (10, 14): 23, (10, 15): 24}
# inputs that must be constants (initializers / Constant nodes), and the release that lifted the rule (None: never)
CONSTANT_INPUTS = {"Slice": (3, (10, 3)), "Squeeze": (1, (10, 7)), "Unsqueeze": (1, (10, 7)), "CumSum": (1, None),
                   **{op: (1, None) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                               "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}}


def parse_version(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def supported_ops(version: str) -> frozenset[str]:
    v = parse_version(version)
    return BASE_10_0.union(*(ops for since, ops in ADDED.items() if v >= since))


def max_opset(version: str) -> int:
    v = parse_version(version)
    return max(opset for since, opset in MAX_OPSET.items() if v >= since)


@dataclass(frozen=True)
class Unsupported:
    node: str
    op: str
    why: str


def check(model, version: str) -> list[Unsupported]:
    """What in `model` (model-local functions inlined, as the parser imports them) TensorRT `version`'s parser
    rejects: ops it has no importer for, an opset past its range, and the restrictions edgevl's graphs could meet."""
    from onnx import helper, inliner
    model = inliner.inline_local_functions(model) if model.functions else model
    v = parse_version(version)
    ops, out = supported_ops(version), []
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset > max_opset(version):
        out.append(Unsupported("", "opset", f"default-domain opset {opset} is past TensorRT {version}'s "
                                            f"{max_opset(version)}"))
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            out.append(Unsupported(node.name, node.op_type, f"no importer in TensorRT {version}"))
            continue
        rule = CONSTANT_INPUTS.get(node.op_type)
        if rule and (rule[1] is None or v < rule[1]) and len(node.input) > rule[0] and node.input[rule[0]] \
                and node.input[rule[0]] not in constants:
            out.append(Unsupported(node.name, node.op_type, f"input {rule[0]} must be a constant"))
        if node.op_type == "Attention":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if any(node.input[i] for i in range(4, min(len(node.input), 7))) or len(node.output) > 1 \
                    or attrs.get("qk_matmul_output_mode", 0) or attrs.get("softcap", 0.0):
                out.append(Unsupported(node.name, "Attention", "past/present KV, nonpad_kv_seqlen, extra outputs, "
                                                               "qk_matmul_output_mode and softcap are not parsed"))
    return out


def refusal(graph_file: str, version: str, problems: list[Unsupported]) -> str | None:
    """One sentence for a graph TensorRT `version` cannot parse, or None."""
    if not problems:
        return None
    listed = sorted({f"{p.op} ({p.why})" for p in problems})
    fused = {"Attention", "RotaryEmbedding", "RMSNormalization", "opset"} & {p.op for p in problems}
    advice = ("re-export with --variant standard --opset 18 (the same graphs in primitive ops, which TensorRT 10.3 "
              "and later parse), or use TensorRT 10.15 or newer" if fused else "this TensorRT cannot build it")
    return f"TensorRT {version}'s ONNX parser does not take {graph_file}: {'; '.join(listed[:4])}; {advice}."
