"""The exported `standard` graphs against each TensorRT version's ONNX parser (runtime/backends/trt_parser.py).

docs/graphs.md offers two opsets: 23 (the default: fused Attention, RotaryEmbedding, RMSNormalization), which
TensorRT 10.15 and later parse, and 18 (the same math in primitive ops) for JetPack 6's TensorRT 10.3 and
JetPack 7.0/7.1's 10.13. Every graph of each opset must use only ops (and attributes) the versions the docs
pair it with take; the opset-23 graphs must be refused, with the re-export advice, by the older ones.
"""

from __future__ import annotations

import sys

import onnx
import pytest

from edgevl.artifact import load_artifact, names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import sizing, trt, trt_parser
from tests.fake_trt import FakeBuild, fake_tensorrt

# opset -> the TensorRT versions docs/jetson.md pairs with it
PAIRED = {23: ("10.15.1", "10.16.1", "11.0.0", "11.4.0"), 18: ("10.3.0", "10.13.3", "10.14.1", "10.16.1", "11.4.0")}
TOO_OLD_FOR_23 = ("10.3.0", "10.13.3", "10.14.1")


@pytest.fixture(scope="module")
def standard_23(tiny_artifact_standard):
    return load_artifact(tiny_artifact_standard)


@pytest.fixture(scope="module")
def standard_18(tiny_model_dir, tmp_path_factory):
    from edgevl.export.exporter import export_model
    out = tmp_path_factory.mktemp("opset18") / "tiny-standard-18"
    return load_artifact(export_model(str(tiny_model_dir), out, dtype="fp32", variant="standard", opset=18,
                                      log=lambda msg: None))


def _graphs(art):
    return {kind: onnx.load(str(art.graph_path(kind)), load_external_data=False) for kind in names.GRAPH_KINDS}


def test_opset_23_graphs_parse_on_10_15_and_later_only(standard_23):
    assert standard_23.manifest.graph(names.DECODER).opset == 23
    for kind, model in _graphs(standard_23).items():
        for version in PAIRED[23]:
            assert trt_parser.check(model, version) == [], (kind, version)
        for version in TOO_OLD_FOR_23:
            ops = {p.op for p in trt_parser.check(model, version)}
            assert "RotaryEmbedding" in ops, (kind, version, ops)
    decoder = _graphs(standard_23)[names.DECODER]
    assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= {n.op_type for n in decoder.graph.node}


def test_opset_18_graphs_parse_on_every_supported_version(standard_18):
    for kind, model in _graphs(standard_18).items():
        used = {n.op_type for n in model.graph.node}
        assert not used & {"Attention", "RMSNormalization", "RotaryEmbedding"}, kind
        for version in PAIRED[18]:
            assert trt_parser.check(model, version) == [], (kind, version, trt_parser.check(model, version))


def test_the_parser_table_holds_the_documented_restrictions():
    """A constant-only input fed at run time, an Attention with a KV cache: refused where the docs say so."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Shape", ["x"], ["axes"]),
             helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
             helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk2", "pv2"])]
    f = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "q", "k", "v", "pk", "pv")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("m", "y", "pk2", "pv2")]
    model = helper.make_model(helper.make_graph(nodes, "g", f, outs), opset_imports=[helper.make_opsetid("", 23)])
    problems = {(p.op, p.why) for p in trt_parser.check(model, "10.16.1")}
    assert ("ReduceMean", "input 1 must be a constant") in problems
    assert any(op == "Attention" and "past/present" in why for op, why in problems)
    assert trt_parser.max_opset("10.3.0") == 20 and trt_parser.max_opset("11.4.0") == 24


def test_the_trt_backend_refuses_an_opset_23_graph_on_tensorrt_10_3_in_one_sentence(standard_23, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", FakeBuild()))
    graph = standard_23.graph(names.DECODER)
    profiles = sizing.build_profiles(names.DECODER, graph.spec.inputs, sizing.Limits(max_context=32),
                                     standard_23.config)
    with pytest.raises(EdgevlError, match=r"TensorRT 10\.3\.0's ONNX parser does not take decoder.onnx: .*"
                                          r"re-export with --variant standard --opset 18"):
        trt.EngineFromOnnx(graph.path, profiles, trt.BuildOptions(), log=lambda msg: None)()
