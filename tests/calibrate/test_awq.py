"""AWQ: the pure math (block-wise RTN equal to onnxruntime's MatMulNBits, the alpha search) and the graph pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevl.calibrate import awq, passes


def _outlier_problem(seed=0, k=128, n=48, rows=256):
    """Weights N(0, 1); activations with a few input channels 30x larger (the case AWQ exists for)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(np.float32)
    gain = np.ones(k, np.float32)
    gain[rng.choice(k, 6, replace=False)] = 30.0
    x = (rng.normal(size=(rows, k)) * gain).astype(np.float32)
    return w, x


def _one_matmul(w: np.ndarray, block: int) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("k", [96, 100])                 # 100: the last block is zero-padded
def test_rtn_matches_onnxruntime_matmulnbits(k):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(k, 24)).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3])                                 # a column with no negative values (zero point 0)
    x = rng.normal(size=(7, k)).astype(np.float32)
    q = passes.nbits_weights(_one_matmul(w, 32), ["mm"], 4, 32, "rtn")
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"]
    expected = x @ awq.fake_quantize(w, 32)
    assert np.allclose(_run(q, x), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, x @ w, atol=1e-2)       # it is really quantized


def test_awq_never_worse_than_rtn_and_better_with_outliers():
    w, x = _outlier_problem()
    mean = np.abs(x).mean(0)
    res = awq.awq_search(w, x, mean, block=32)
    rtn = np.square(x @ w - x @ awq.fake_quantize(w, 32)).sum() / np.square(x @ w).sum()
    assert res.rtn_loss == pytest.approx(rtn, rel=1e-5)
    assert res.alpha > 0 and res.loss < 0.8 * res.rtn_loss            # strictly (and clearly) better
    # no outliers, any data: the search can only match or beat RTN on the sample it measures
    rng = np.random.default_rng(3)
    x2 = rng.normal(size=(64, 128)).astype(np.float32)
    res2 = awq.awq_search(w, x2, np.abs(x2).mean(0), block=32, grid=5)
    assert res2.loss <= res2.rtn_loss
    s = awq.awq_scales(mean, 0.5)
    assert s.shape == (128,) and np.isclose(s.max() * s.min(), 1, rtol=1e-5)


def test_row_stats_stream_bounded_and_exact_mean():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(1, n, 8)).astype(np.float32) for n in (5, 300, 1, 400, 1)]
    st = awq.RowStats(max_rows=64, seed=0)
    for c in chunks:
        st.add(c)
    rows = np.concatenate([c.reshape(-1, 8) for c in chunks])
    assert st.count == len(rows) and np.allclose(st.mean_abs, np.abs(rows).mean(0), rtol=1e-5)
    assert st.rows.shape == (64, 8)
    assert all((rows == r).all(1).any() for r in st.rows)            # sampled rows are real rows


def test_prescale_pass_is_exact_in_fp32_and_is_awq_after_rtn():
    """Mul(x, 1/s) + w*s computes x @ w in fp32; then RTN of the rescaled graph == (x/s) @ deq(q(w*s))."""
    w, x = _outlier_problem(seed=2, k=64, n=16, rows=128)
    model = _one_matmul(w, 32)
    st = awq.RowStats(512)
    st.add(x)
    scaled, records = passes.awq_prescale(model, ["mm"], {"x": st}, 32)
    assert len(records) == 1 and records[0]["alpha"] > 0
    assert [n.op_type for n in scaled.graph.node] == ["Mul", "MatMul"]
    assert np.allclose(_run(scaled, x), x @ w, rtol=1e-4, atol=1e-3)
    q = passes.nbits_weights(scaled, ["mm"], 4, 32, "awq")
    res = awq.awq_search(w, x, st.mean_abs, 32)
    expected = (x / res.scales) @ awq.fake_quantize(w * res.scales[:, None], 32)
    out = _run(q, x)
    assert np.allclose(out, expected, rtol=1e-3, atol=1e-3)
    err = np.square(out - x @ w).sum() / np.square(x @ w).sum()
    rtn = np.square(_run(passes.nbits_weights(_one_matmul(w, 32), ["mm"], 4, 32, "rtn"), x) - x @ w).sum()
    assert err < rtn / np.square(x @ w).sum()
    assert passes.awq_summary(records)["scaled_groups"] == 1
