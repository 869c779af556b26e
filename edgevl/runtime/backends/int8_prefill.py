"""ort-cpu, opt-in (`--int8-prefill`): a w4a16 decoder's prompt calls run on int8 copies of its 4-bit weights.

onnxruntime's CPU `MatMulNBits` multiplies many rows at about half the rate of its per-channel int8 GEMM
(`benchmarks/kernel_probe.py blocks`: ~750 vs ~1500 GFLOP/s on a 2-core EPYC), which makes the prefill of a
w4a16 artifact slower than an int8 one's, while its decode steps (one row) are the faster. So the runner
holds two sessions of the one decoder file: the graph as exported for decode steps, and a prefill graph in
which each 4-bit `MatMulNBits` but the lm_head (it multiplies the last position only) becomes a
`DynamicQuantizeMatMul` over int8 per-column weights requantized from the dequantized 4-bit blocks at load
(`dequantize_4bit`, `per_channel_int8`: pure numpy). Calls with more than one position per row go to the
prefill session; both bind the same in-place KV buffers, so the cache a prefill writes is the one decode
steps read.

Costs: one more byte per weight in memory and a longer load (the requantization, the second session);
numerics: the int8 copy adds a rounding step below the 4-bit one (per column, 1/127 of its largest value),
and the dynamic activation scale is per call, so a chunked prefill is not bit-identical to a whole one and
the greedy tokens can differ from the plain w4a16 run's. The files on disk stay as exported.
"""

from __future__ import annotations

import numpy as np

from edgevl.artifact import names

OP = "MatMulNBits"


def dequantize_4bit(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                    block: int) -> np.ndarray:
    """MatMulNBits' 4-bit weights as float32 [K, N]: packed [N, blocks, block/2] (low nibble first), scales
    [N * blocks], zero points [N * ceil(blocks/2)] packed the same way (8 when absent)."""
    blocks = -(-k // block)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
    if zero_points is None:
        z = np.full((n, blocks), 8, np.float32)
    else:
        zp = zero_points.reshape(n, -1)
        z = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    w = (q - z[:, :, None]) * scales.reshape(n, blocks)[:, :, None].astype(np.float32)
    return np.ascontiguousarray(w.reshape(n, blocks * block)[:, :k].T)


def per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of w [K, N]: (q int8 [K, N], scale float32 [N]), w ~= q * scale."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _attrs(node) -> dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def candidates(model, vocab_size: int) -> list:
    """The 4-bit MatMulNBits nodes the prefill graph replaces: all but an lm_head (N = the vocabulary)."""
    return [node for node in model.graph.node if node.op_type == OP and node.domain == "com.microsoft"
            and _attrs(node).get("bits") == 4 and _attrs(node)["N"] != vocab_size]


def prefill_rewrite(folder, vocab_size: int):
    """transform(model) -> {initializer name: array} for SessionFromOnnx: the prefill graph (module docstring)
    of a decoder whose external weights live in `folder`; the new int8 weights are handed over as arrays."""
    def transform(model) -> dict[str, np.ndarray]:
        from onnx import helper, numpy_helper
        inits = {t.name: t for t in model.graph.initializer}
        value = lambda name: numpy_helper.to_array(inits[name], base_dir=str(folder)) if name else None  # noqa: E731
        new, replaced = {}, set()
        for node in candidates(model, vocab_size):
            a = _attrs(node)
            inputs = list(node.input) + [""] * (6 - len(node.input))
            w = dequantize_4bit(value(inputs[1]), value(inputs[2]), value(inputs[3]), a["K"], a["N"], a["block_size"])
            q, scale = per_channel_int8(w)
            wq, ws = f"{node.name}/int8_prefill/w", f"{node.name}/int8_prefill/scale"
            new[wq], new[ws] = q, scale
            replaced.update(x for x in inputs[1:4] if x)
            bias = ["", inputs[5]] if inputs[5] else []              # MatMulNBits' input 5, DQMM's 4
            node.CopyFrom(helper.make_node("DynamicQuantizeMatMul", [inputs[0], wq, ws, *bias], list(node.output),
                                           name=node.name, domain="com.microsoft"))
        still_used = {i for n in model.graph.node for i in n.input}
        kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        return new
    return transform


class PrefillSplitRunner:
    """A Runner over two sessions of one decoder: `prefill` for calls with more than one position per row,
    `decode` for the rest (module docstring). Everything else (metadata, buffers, spare KV positions) is the
    decode runner's."""

    def __init__(self, decode, prefill):
        self.decode, self.prefill = decode, prefill
        self.name = f"{decode.name}+int8-prefill"
        self.device, self.device_id = decode.device, decode.device_id
        self.kv_spare_positions, self.static_decode = decode.kv_spare_positions, decode.static_decode

    def input_metadata(self):
        return self.decode.input_metadata()

    def allocate(self, shape, dtype):
        return self.decode.allocate(shape, dtype)

    def activate(self) -> None:
        from edgevl.runtime.backends.runner import activate_all
        activate_all([self.decode, self.prefill], concurrently=False)

    def deactivate(self) -> None:
        self.decode.deactivate()
        self.prefill.deactivate()

    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        many = np.shape(feed[names.INPUTS_EMBEDS])[1] > 1
        return (self.prefill if many else self.decode).infer(feed, bindings)
