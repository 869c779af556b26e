"""ort-cuda on a CPU machine: what onnxruntime's CUDA EP would do with edgevl's `ort` graphs (runtime/backends/ort_placement.py).

The lint: every exported `ort` graph (fp32, an fp16 export, the fp16 / int8 / w4a16 quantize passes) has a CUDA
kernel for every node's types or is refused with one sentence, and no GPU node takes a value computed on the host
(shape arithmetic onnxruntime places on the CPU) as data: such a value is a Memcpy node per run, which rules out
CUDA graphs. Then how make_ort_cuda and the session loader act on it, with onnxruntime faked where a GPU would be
needed, and the device buffers (zeroed).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgevl.artifact import load_artifact, names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import ort_placement
from edgevl.runtime.backends import ort, ort_session
from edgevl.runtime.backends.ort_placement import place


@pytest.fixture(scope="module")
def art(tiny_artifact):
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def fp16_export(tiny_model_dir, tmp_path_factory):
    from edgevl.export.exporter import export_model
    return load_artifact(export_model(str(tiny_model_dir), tmp_path_factory.mktemp("fp16") / "tiny-fp16", dtype="fp16",
                                      log=lambda msg: None))


@pytest.fixture(scope="module")
def quantized_decoders(art, tmp_path_factory):
    """The decoder after each quantize recipe's graph pass (no calibration: the ops and types are what matter)."""
    from edgevl.artifact.onnx_files import save_graph
    from edgevl.calibrate import passes
    from edgevl.calibrate.graph_edit import gemm_to_matmul, load_graph, weight_nodes, with_shapes
    src, tmp_path = art.graph_path(names.DECODER), tmp_path_factory.mktemp("quantized")
    matmuls = gemm_to_matmul(load_graph(src))
    save_graph(matmuls, tmp_path / "matmul.onnx", check=False)
    passes.int8_dynamic(tmp_path / "matmul.onnx", tmp_path / "int8.onnx", [n.name for n in weight_nodes(matmuls)])
    body = [n.name for n in weight_nodes(load_graph(src)) if n.op_type == "MatMul"]
    return {"fp16": passes.fp16_convert(with_shapes(src), set(), keep_io=[names.LOGITS]),
            "int8": onnx.load(str(tmp_path / "int8.onnx")),
            "w4a16": passes.nbits_weights(load_graph(src), body, 4, 32, "rtn")}


def _graph(path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _crossings_off_missing_kernels(p: ort_placement.Placement) -> list:
    """Host/device copies other than those around nodes that have no CUDA kernel (reported as such)."""
    missing = {k.node for k in p.no_kernel}
    return [c for c in p.crossings if c.consumer not in missing and c.producer not in missing]


# ----------------------------------------------------------------------------- the lint over the exported graphs
def test_fp16_graphs_run_wholly_on_cuda_with_no_host_copies(fp16_export, quantized_decoders):
    for kind in names.GRAPH_KINDS:
        p = place(_graph(fp16_export.graph_path(kind)))
        assert p.clean, (kind, p.no_kernel, p.unknown, p.crossings)
    p = place(quantized_decoders["fp16"])                   # `edgevl quantize --recipe fp16`'s decoder
    assert p.clean, (p.no_kernel, p.unknown, p.crossings)


def test_no_gpu_node_reads_host_shape_arithmetic_as_data(art, quantized_decoders):
    """fp32 / int8 / w4a16: the only host copies are those around nodes with no CUDA kernel (refused below);
    none comes from shape arithmetic. The last-token index of the in-place decoder used to be one
    (minimum(seqlens_k, S - 1), S from a Shape chain: a Memcpy that ruled out --cuda-graph)."""
    graphs = {f"fp32 {kind}": _graph(art.graph_path(kind)) for kind in names.GRAPH_KINDS}
    graphs.update({f"{name} decoder": m for name, m in quantized_decoders.items()})
    for name, model in graphs.items():
        p = place(model)
        assert not p.unknown, f"{name}: ops missing from ort_placement.CUDA_TYPES: {p.unknown}"
        assert not _crossings_off_missing_kernels(p), (name, p.crossings)
        assert all(n.op != "Min" for n in p.no_kernel)


def test_attention_without_a_cuda_kernel_is_found_in_fp32_int8_and_w4a16(art, quantized_decoders):
    decoders = {"fp32": _graph(art.graph_path(names.DECODER)), **quantized_decoders}
    missing = {name: {(k.op, k.dtype) for k in place(m).no_kernel} for name, m in decoders.items()}
    gqa = ("GroupQueryAttention", "float")
    assert gqa in missing["fp32"] and gqa in missing["int8"] and gqa in missing["w4a16"]
    assert ("DynamicQuantizeLinear", "float") in missing["int8"]
    assert missing["fp16"] == set()
    assert not place(_graph(art.graph_path(names.VISION))).no_kernel      # MultiHeadAttention runs in fp32 on CUDA


# ----------------------------------------------------------------------------- the placement rule itself
def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_shape_arithmetic_feeding_data_is_a_host_copy_and_feeding_a_shape_input_is_not():
    """GetCpuPreferredNodes: Shape -> Gather -> Sub runs on the CPU; as Reshape's shape that is free, as Min's data
    it is a copy to the GPU (the old last-token index, reduced to its nodes)."""
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "axis"], ["n"], name="gather"),
             helper.make_node("Sub", ["n", "one"], ["last"], name="sub"),
             helper.make_node("Cast", ["seqlens_k"], ["lens"], to=TensorProto.INT64, name="cast"),
             helper.make_node("Min", ["lens", "last"], ["index"], name="min"),
             helper.make_node("Unsqueeze", ["n", "axis"], ["n1"], name="unsqueeze"),
             helper.make_node("Reshape", ["x", "n1"], ["flat"], name="reshape")]
    model = _model(nodes, [_tensor("x", TensorProto.FLOAT, ["b", "s"]), _tensor("seqlens_k", TensorProto.INT32, ["b"])],
                   [_tensor("index", TensorProto.INT64, ["b"]), _tensor("flat", TensorProto.FLOAT, None)], [one, axis])
    p = place(model)
    assert set(p.cpu_nodes) == {"gather", "sub", "unsqueeze"}     # Cast reads a graph input only: not a candidate
    crossings = [(c.op, c.input_index, c.to_device) for c in p.crossings]
    assert crossings == [("Min", 1, True)]                 # Reshape's shape input reads host memory: no copy


def test_fp16_inputs_keep_a_node_on_the_gpu_and_gqa_fp32_has_no_kernel():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["h", "x16"], ["y"])]
    model = _model(nodes, [_tensor("x", TensorProto.FLOAT, ["n"]), _tensor("x16", TensorProto.FLOAT16, ["n"])],
                   [_tensor("y", TensorProto.FLOAT16, ["n"])])
    p = place(model)
    assert [c.op for c in p.crossings] == ["Mul"]          # Cast ran on the CPU (its output is new); Mul is fp16
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "lens", "total"], ["o", "k2", "v2"],
                           domain="com.microsoft", num_heads=2, kv_num_heads=1)
    f32 = [_tensor(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "pk", "pv")]
    model = _model([gqa], [*f32, _tensor("lens", TensorProto.INT32, ["b"]), _tensor("total", TensorProto.INT32, [])],
                   [_tensor(n, TensorProto.FLOAT, None) for n in ("o", "k2", "v2")])
    p = place(model, host_inputs=("total",))
    assert [(k.op, k.dtype, k.types) for k in p.no_kernel] == [("GroupQueryAttention", "float", ("bfloat16", "float16"))]
    sentence = ort_placement.refusal("decoder.onnx", "OUT", "fp32", p)
    assert "quantize OUT -o OUT-fp16 --recipe fp16" in sentence and "GroupQueryAttention" in sentence


# ----------------------------------------------------------------------------- make_ort_cuda and the session
def _no_session(*args, **kwargs):
    raise AssertionError("a session was made")


def test_ort_cuda_refuses_an_fp32_decoder_before_making_a_session(art, monkeypatch):
    monkeypatch.setattr(ort_session.SessionFromOnnx, "__call__", _no_session)
    with pytest.raises(EdgevlError, match=r"GroupQueryAttention on float .*--recipe fp16"):
        backends.make_ort_cuda(art.graph(names.DECODER), backends.BackendOptions())
    runner = backends.make_ort_cuda(art.graph(names.VISION), backends.BackendOptions())   # fp32 vision: fine
    assert runner.device == "cuda"


def test_ort_cuda_session_settings_follow_the_prediction(fp16_export, monkeypatch):
    graph = fp16_export.graph(names.DECODER)
    runner = backends.make_ort_cuda(graph, backends.BackendOptions(cuda_graph=True))
    loader = runner.build_session
    # shape arithmetic on the CPU is predicted: the CPU EP stays, the fallback entry would refuse it
    assert ort_session.provider_names(loader.providers) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert loader.config_entries == () and runner.static_decode
    assert dict(loader.providers[0][1])["enable_cuda_graph"] == "1"
    nothing = ort_placement.Placement((), (), (), ())
    monkeypatch.setattr(ort_placement, "check_for_cuda", lambda *a: nothing)
    loader = backends.make_ort_cuda(graph, backends.BackendOptions()).build_session
    assert ort_session.provider_names(loader.providers) == ["CUDAExecutionProvider"]    # naming CPU would conflict
    assert loader.config_entries == (("session.disable_cpu_ep_fallback", "1"),)
    copy = ort_placement.Crossing("sub_77", "node_sub_77", "node_minimum", "Min", 1, to_device=True)
    monkeypatch.setattr(ort_placement, "check_for_cuda", lambda *a: ort_placement.Placement(("n",), (), (), (copy,)))
    with pytest.raises(EdgevlError, match="--cuda-graph: decoder copies sub_77 to the GPU for Min"):
        backends.make_ort_cuda(graph, backends.BackendOptions(cuda_graph=True))
    logged = []
    backends.make_ort_cuda(graph, backends.BackendOptions(log=logged.append))
    assert logged and "sub_77" in logged[0]


class _FakeOptions:
    def __init__(self):
        self.entries = {}
        self.intra_op_num_threads = 0

    def add_session_config_entry(self, key, value):
        self.entries[key] = value


def _fake_onnxruntime(seen: dict):
    class InferenceSession:
        def __init__(self, model, options, providers=None, disabled_optimizers=None):
            seen["entries"] = dict(options.entries)
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned "
                               "to the default CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")

    levels = types.SimpleNamespace(ORT_DISABLE_ALL=0, ORT_ENABLE_BASIC=1, ORT_ENABLE_EXTENDED=2, ORT_ENABLE_ALL=99)
    return types.SimpleNamespace(__version__="1.31.1", SessionOptions=_FakeOptions, InferenceSession=InferenceSession,
                                 GraphOptimizationLevel=levels,
                                 get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_a_refused_cpu_fallback_is_one_sentence(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_onnxruntime(seen))
    loader = ort_session.SessionFromOnnx(tmp_path / "decoder.onnx", providers=[("CUDAExecutionProvider", {})],
                                     config_entries=(("session.disable_cpu_ep_fallback", "1"),))
    with pytest.raises(EdgevlError, match=r"^onnxruntime would run some nodes of decoder.onnx on the CPU") as e:
        loader()
    assert "\n" not in str(e.value) and seen["entries"] == {"session.disable_cpu_ep_fallback": "1"}


# ----------------------------------------------------------------------------- device buffers
class _DeviceValue:
    """An OrtValue in 'device' memory: ortvalue_from_shape_and_type hands back whatever the block held (NaN here)."""

    def __init__(self, array, device):
        self.array, self.device = array, device

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, dtype, device, device_id):
        return cls(np.full(shape, np.nan, dtype), device)

    @classmethod
    def ortvalue_from_numpy(cls, array, device="cpu", device_id=0):
        return cls(np.array(array, copy=True), device)

    def numpy(self):
        return self.array.copy()

    def shape(self):
        return list(self.array.shape)

    def device_name(self):
        return self.device

    def data_type(self):
        return "tensor(float16)"


def test_device_buffers_are_zeroed(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(OrtValue=_DeviceValue))
    runner = ort.OrtIoBindingRunner(lambda: None, device="cuda")
    buffer = runner.allocate((1, 2, 8, 4), np.float16)
    assert buffer.ortvalue.device_name() == "cuda" and buffer.array is None
    values = buffer.numpy()
    assert values.shape == (1, 2, 8, 4) and values.dtype == np.float16 and not values.any()
