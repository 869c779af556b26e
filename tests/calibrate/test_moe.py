"""MoE experts to 4 / 8 bits (calibrate/moe.py) against onnxruntime's QMoE kernel.

A one-node MoE graph and its QMoE rewrite run on the same tokens and router logits: with float activations
(accuracy_level 0) the 4-bit QMoE must give what MoE gives over the dequantized experts to float rounding, which
holds only if the packing, the scale and zero-point layout and the interleaved gate/up rows are what the
kernel reads. 8-bit experts (and 4-bit with accuracy_level 4) compute with int8 activations, so they are held
to the error of quantizing the activations, well below what a wrong layout gives.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgevl.calibrate import moe
from edgevl.calibrate.awq import fake_quantize
from edgevl.calibrate.graph_edit import weight_summary

E, H, I, K, T = 8, 64, 96, 2, 7


def _graph(fc1: np.ndarray, fc2: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], name="layers.0.mlp",
                            domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=1,
                            normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, T, H]),
                                              helper.make_tensor_value_info("router", onnx.TensorProto.FLOAT, [T, E])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    fc1 = (rng.normal(size=(E, 2 * I, H)) * 0.1).astype(np.float32)
    fc2 = (rng.normal(size=(E, H, I)) * 0.1).astype(np.float32)
    feeds = {"x": rng.normal(size=(1, T, H)).astype(np.float32), "router": rng.normal(size=(T, E)).astype(np.float32)}
    return fc1, fc2, feeds


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _experts(model: onnx.ModelProto, bits: int) -> tuple[np.ndarray, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return tuple(moe.dequantize_experts(inits[f"{w}.q{bits}"], inits[f"{w}.scales{bits}"], inits[f"{w}.zp{bits}"], bits)
                 for w in ("fc1", "fc2"))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_are_matmulnbits_blocks_per_expert(case, bits):
    fc1, _, _ = case
    packed, scales, zeros = moe.quantize_experts(fc1, bits, 32)
    assert packed.shape == (E, 2 * I, H * bits // 8) and scales.shape == (E, 2 * I, H // 32)
    assert zeros.shape == (E, 2 * I, -(-(H // 32) * bits // 8))
    want = np.stack([fake_quantize(w.T, 32, bits).T for w in fc1])     # awq's MatMulNBits math, per expert
    np.testing.assert_array_equal(moe.dequantize_experts(packed, scales, zeros, bits), want)
    step = np.repeat(scales, 32, axis=-1)
    assert np.all(np.abs(want - fc1) <= step / 2 + 1e-6)                # round to nearest within every block


def test_four_bit_experts_with_float_activations_are_what_the_kernel_multiplies(case):
    fc1, fc2, feeds = case
    model, block = moe.moe_to_qmoe(_graph(fc1, fc2), 4, 32, accuracy_level=0)
    assert block == 32 and [n.op_type for n in model.graph.node] == ["QMoE"]
    assert {t.name for t in model.graph.initializer}.isdisjoint({"fc1", "fc2"})      # no float experts left
    dequantized = _run(_graph(*_experts(model, 4)), feeds)
    np.testing.assert_allclose(_run(model, feeds), dequantized, atol=1e-5, rtol=0)
    float_out = _run(_graph(fc1, fc2), feeds)
    assert np.abs(dequantized - float_out).max() > 1e-3                   # the check above is not float vs float


def test_a_wrong_layout_would_fail_the_check(case):
    """Swapping the nibbles of the packed fc1 moves the output far outside the tolerance the tests above use."""
    fc1, fc2, feeds = case
    model, _ = moe.moe_to_qmoe(_graph(fc1, fc2), 4, 32)
    good = _run(model, feeds)
    packed = next(t for t in model.graph.initializer if t.name == "fc1.q4")
    raw = numpy_helper.to_array(packed)
    packed.CopyFrom(numpy_helper.from_array(((raw & 0x0F) << 4) | (raw >> 4), packed.name))
    assert np.abs(_run(model, feeds) - good).max() > 0.05


@pytest.mark.parametrize("bits, level", [(8, 0), (4, 4)])
def test_int8_compute_stays_within_activation_rounding(case, bits, level):
    fc1, fc2, feeds = case
    model, _ = moe.moe_to_qmoe(_graph(fc1, fc2), bits, 32, accuracy_level=level)
    dequantized = _run(_graph(*_experts(model, bits)), feeds)
    scale = np.abs(dequantized).max()
    assert np.abs(_run(model, feeds) - dequantized).max() < 0.03 * scale


def test_block_is_the_largest_power_of_two_dividing_both_widths():
    assert moe.expert_block(2048, 768, 128) == 128           # 30B-A3B
    assert moe.expert_block(64, 96, 128) == 32
    assert moe.expert_block(64, 32, 100) == 32               # not above the recipe's block, a power of two
    assert moe.expert_block(64, 24, 128) is None             # 8 is below QMoE's smallest block


def test_no_fitting_block_keeps_float_experts_and_says_why(case):
    fc1, fc2, _ = case
    model = _graph(fc1[:, :48], fc2[:, :, :24])
    result = moe.quantize_graph_experts(model, 4, 128)
    assert result["experts"]["bits"] == 32 and "kept float" in result["note"]
    assert [n.op_type for n in model.graph.node] == ["MoE"]
    assert moe.quantize_graph_experts(onnx.ModelProto(), 4, 128) == {}


def test_weight_table_counts_the_experts(case):
    fc1, fc2, _ = case
    before = weight_summary(_graph(fc1, fc2))
    assert before["fp32"]["bytes"] == fc1.nbytes + fc2.nbytes
    model, _ = moe.moe_to_qmoe(_graph(fc1, fc2), 4, 32)
    after = weight_summary(model)
    assert after["int4"]["fp32_bytes"] == before["fp32"]["fp32_bytes"]
    packed = (fc1.size + fc2.size) // 2                     # 4 bits a weight
    scales = 4 * (fc1.size + fc2.size) // 32                # a float32 scale per block of 32
    zeros = E * 2 * I * (H // 32 // 2) + E * H * -(-(I // 32) // 2)   # 4-bit zero points, rows padded to bytes
    assert after["int4"]["bytes"] == packed + scales + zeros
