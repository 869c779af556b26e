"""Mixture-of-experts weights to 4 or 8 bits: onnxruntime's com.microsoft.MoE -> com.microsoft.QMoE.

The `ort` decoder of a Qwen3-VL-MoE model runs its sparse layers as com.microsoft.MoE over float expert weights
(export/moe.py): fc1 [E, 2I, H] (gate and up rows interleaved), fc2 [E, H, I]. Those are most of the model's
bytes (30B-A3B: 48 layers x 128 experts), and onnxruntime's MatMul quantizers do not see them, so the int8 and
w4a16 recipes turn each MoE node into a QMoE node with the same routing attributes and the experts stored as

    weights      uint8 [E, N, K * bits / 8]          rows of N, K packed low nibble first at 4 bits
    scales       float [E, N, K / block]
    zero points  uint8 [E, N, ceil(K / block * bits / 8)]

per expert exactly what MatMulNBits stores for a [K, N] weight (asymmetric round-to-nearest per block of K,
awq.rtn_quantize_blockwise), which is onnxruntime's raw QMoE layout (`weights_prepacked` 0). The math is pure
(`quantize_experts`, `dequantize_experts`) and tested against the kernel; `moe_to_qmoe` is the graph edit.

QMoE needs the block to divide both H and I and to be a power of two of at least 16: `expert_block` picks the
largest such block not above the recipe's. A model where none exists keeps float experts, and the recipe says so.
`standard` graphs have no MoE node (their experts are plain MatMuls over stacked weights) and are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgevl.calibrate.awq import rtn_quantize_blockwise
from edgevl.calibrate.embedding import pack

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
    uint8 zero points [E, N, ceil(K / block * bits / 8)])."""
    experts, n, k = weights.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    packed, scales, zeros = [], [], []
    for w in weights:
        q, s, z = rtn_quantize_blockwise(np.asarray(w, np.float32).T, block, bits)     # [blocks, block, N]
        packed.append(pack(q.transpose(2, 0, 1).reshape(n, k), bits))
        z = z.T                                                                       # [N, blocks]
        if bits == 4 and z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        scales.append(s.T)
        zeros.append(pack(z, bits))
    return np.stack(packed), np.stack(scales).astype(np.float32), np.stack(zeros)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count].astype(np.float32)
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :count].astype(np.float32)


def dequantize_experts(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int) -> np.ndarray:
    """The float [E, N, K] weights that `quantize_experts`' output stands for."""
    experts, n, blocks = scales.shape
    k = packed.shape[-1] * 8 // bits
    q = _unpack(packed, bits, k).reshape(experts, n, blocks, k // blocks)
    zero = _unpack(zeros, bits, blocks)[..., None]
    return ((q - zero) * scales[..., None]).reshape(experts, n, k)


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
