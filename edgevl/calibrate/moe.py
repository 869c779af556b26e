"""Mixture-of-experts weights to 4 or 8 bits: onnxruntime's com.microsoft.MoE -> com.microsoft.QMoE.

The `ort` decoder of a Qwen3-VL-MoE model runs its sparse layers as com.microsoft.MoE over float expert weights
(export/moe.py): fc1 [E, 2I, H] (gate and up rows interleaved), fc2 [E, H, I]. Those are most of the model's
bytes (30B-A3B: 48 layers x 128 experts), and onnxruntime's MatMul quantizers do not see them, so the int8 and
w4a16 recipes turn each MoE node into a QMoE node with the same routing attributes and the experts stored as

    weights      uint8 [E, N, K * bits / 8]          rows of N, K packed low nibble first at 4 bits
    scales       float [E, N, K / block]
    zero points  uint8 [E, N, ceil(K / block * bits / 8)]

per expert exactly what MatMulNBits stores for a [K, N] weight (asymmetric round-to-nearest per block of K: the
rows embedding.quantize_rows writes and runtime.embeddings.dequantize_rows reads), which is onnxruntime's raw QMoE
layout (`weights_prepacked` 0). `quantize_experts` and `dequantize_experts` are those two per expert, tested
against the kernel; `moe_to_qmoe` is the graph edit.

QMoE needs the block to divide both H and I and to be a power of two of at least 16: `expert_block` picks the
largest such block not above the recipe's. A model where none exists keeps float experts, and the recipe says so.
`standard` graphs have no MoE node (their experts are plain MatMuls over stacked weights) and are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgevl.calibrate.embedding import quantize_rows
from edgevl.runtime.embeddings import dequantize_rows

MIN_BLOCK = 16
_COPIED = ("k", "activation_type", "swiglu_fusion", "normalize_routing_weights", "activation_alpha",
           "activation_beta", "swiglu_limit")


def expert_block(hidden: int, inter: int, block: int) -> int | None:
    """The largest power of two <= `block` and >= 16 dividing both `hidden` and `inter`; None when there is none."""
    size = 1 << (max(block, 1).bit_length() - 1)
    while size >= MIN_BLOCK:
        if hidden % size == 0 and inter % size == 0:
            return size
        size //= 2
    return None


def quantize_experts(weights: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [E, N, K] -> (uint8 [E, N, K * bits / 8], float32 scales [E, N, K / block],
    uint8 zero points [E, N, ceil(K / block * bits / 8)]): each expert as embedding.quantize_rows quantizes a
    table, its [N, blocks, blob] weight read as [N, K * bits / 8]."""
    experts, n, k = weights.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    parts = [quantize_rows(w, bits, block) for w in weights]
    return (np.stack([q.reshape(n, -1) for q, _, _ in parts]), np.stack([s for _, s, _ in parts]),
            np.stack([z for _, _, z in parts]))


def dequantize_experts(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int) -> np.ndarray:
    """The float [E, N, K] weights that `quantize_experts`' output stands for (runtime.embeddings.dequantize_rows
    per expert)."""
    experts, n, blocks = scales.shape
    k = packed.shape[-1] * 8 // bits
    return np.stack([dequantize_rows(q.reshape(n, blocks, -1), s, z, bits, k) for q, s, z in zip(packed, scales, zeros)])


def moe_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]


def moe_to_qmoe(model: onnx.ModelProto, bits: int, block: int, accuracy_level: int = 0) -> tuple[onnx.ModelProto, int]:
    """Every com.microsoft.MoE node of `model` (in place) as QMoE with `bits`-bit experts in blocks of at most
    `block`; returns (model, the block used). Returns block 0 and changes nothing when no block fits the
    model's widths or there is no MoE node."""
    nodes = moe_nodes(model)
    inits = {t.name: t for t in model.graph.initializer}
    if not nodes:
        return model, 0
    fc2 = inits[nodes[0].input[4]]
    experts, hidden, inter = fc2.dims
    size = expert_block(hidden, inter, block)
    if size is None:
        return model, 0
    for node in nodes:
        _replace(model, node, inits, bits, size, accuracy_level)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model, size


def _replace(model, node, inits, bits, block, accuracy_level) -> None:
    stored = []
    for name in (node.input[2], node.input[4]):
        weights, scales, zeros = quantize_experts(numpy_helper.to_array(inits[name]), bits, block)
        for suffix, array in (("q", weights), ("scales", scales), ("zp", zeros)):
            tensor = numpy_helper.from_array(array, f"{name}.{suffix}{bits}")
            model.graph.initializer.append(tensor)
            stored.append(tensor.name)
    fc1_q, fc1_s, fc1_z, fc2_q, fc2_s, fc2_z = stored
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in _COPIED}
    for attr in attrs:
        if isinstance(attrs[attr], bytes):
            attrs[attr] = attrs[attr].decode()
    qmoe = onnx.helper.make_node(
        "QMoE", [node.input[0], node.input[1], fc1_q, fc1_s, "", fc2_q, fc2_s, "", "", "", "", fc1_z, fc2_z],
        list(node.output), name=node.name, domain="com.microsoft", expert_weight_bits=bits, block_size=block,
        quant_type="int", weights_prepacked=0, accuracy_level=accuracy_level, **attrs)
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(index, qmoe)



def quantize_graph_experts(model: onnx.ModelProto, bits: int, block: int) -> dict:
    """`moe_to_qmoe` on `model` (in place) and what the recipe records of it: {} for a graph without MoE nodes,
    else {"experts": {...}, "note": one line}."""
    count = len(moe_nodes(model))
    if not count:
        return {}
    _, used = moe_to_qmoe(model, bits, block)
    if used:
        return {"experts": {"layers": count, "bits": bits, "block_size": used},
                "note": f"{count} MoE layers' experts in {bits}-bit blocks of {used} (QMoE)"}
    return {"experts": {"layers": count, "bits": 32, "block_size": 0},
            "note": f"{count} MoE layers' experts kept float: no power-of-two block from {MIN_BLOCK} to {block} "
                    f"divides both the hidden and the expert width"}
