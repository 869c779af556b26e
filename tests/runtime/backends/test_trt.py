"""runtime/backends/trt.py: the engine cache key and build options, the M-RoPE inlining the engine backends build
from, the TensorRT runner's profiles, buffers and KV ping-pong over a stand-in engine and host memory, and trt.py
against the Python API of every TensorRT edgevl supports, recorded from the real bindings wheels
(tests/data/trt_api/, benchmarks/trt_api_surface.py): 10.3 (JetPack 6), 10.13 .. 10.16, 11.0 .. 11.4.

The builder and the runner run against a `tensorrt` module with exactly one version's names (tests/fake_trt.py):
a name that version lacks fails as it would there. TensorRT 11 removed BuilderFlag.FP16 / INT8 (networks are
always strongly typed), so --precision fp16 / int8 is a sentence there and a weakly typed build on 10.x. And the
TensorRT EP options table.py passes exist in onnxruntime-gpu 1.31.1's TensorRT EP (tests/data/ort_gpu/).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevl.artifact import names
from edgevl.artifact.folder import Artifact, GraphFile
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import sizing, trt
from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends.ort import OnnxrtRunner
from edgevl.runtime.backends.ort_session import SessionFromOnnx
from edgevl.runtime.compare import compare_outputs
from tests.fake_trt import (
    CheckedEngine,
    FakeBuild,
    FakeEngine,
    HostMemory,
    fake_tensorrt,
    fake_trt_runners,
    recorded_versions,
    surface,
)
from tests.swapped_runners import Swapped, greedy_tokens


VERSIONS = recorded_versions()
ORT_GPU = json.loads((Path(__file__).parents[2] / "data" / "ort_gpu" / "onnxruntime-gpu-1.31.1.json").read_text())
LIMITS = sizing.Limits(max_batch=1, max_context=32, max_image_patches=64)


def _major(version: str) -> int:
    return int(version.split(".")[0])


def test_every_supported_version_is_recorded():
    assert {"10.3.0", "10.13.3.9", "10.15.1.29", "10.16.1.11", "11.0.0.114", "11.4.0.106"} <= set(VERSIONS)


def _build(monkeypatch, version: str, precision: str, art):
    """EngineFromOnnx over the opset-23 standard decoder; the op check is tests/runtime/backends/test_trt_parser.py's
    subject, so it is bypassed here for the versions whose parser lacks the fused ops."""
    build = FakeBuild()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, build))
    monkeypatch.setattr(trt.EngineFromOnnx, "_check_ops", lambda self, version: None)
    graph = art.graph(names.DECODER)
    profiles = sizing.build_profiles(names.DECODER, graph.spec.inputs, LIMITS, art.config)
    logs = []
    blob = trt.EngineFromOnnx(graph.path, profiles, trt.BuildOptions(precision=precision), log=logs.append)()
    return build, blob, profiles, logs


@pytest.mark.parametrize("version", VERSIONS)
def test_graph_precision_builds_strongly_typed_without_tf32(version, art, monkeypatch):
    build, blob, profiles, logs = _build(monkeypatch, version, "graph", art)
    strongly = int(fake_tensorrt(version, FakeBuild()).NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert blob == b"serialized engine" and build.network_flags == 1 << strongly
    assert build.set_flags == [] and build.cleared_flags == ["TF32"]       # fp32 graphs compute in fp32
    assert build.profiles == [p.shapes for p in profiles] and build.phases == ["Building engine"]
    assert any("precision graph" in line for line in logs)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_is_a_weakly_typed_build_on_10_and_a_sentence_on_11(version, precision, art, monkeypatch):
    if _major(version) >= 11:
        recipe = "--recipe fp16" if precision == "fp16" else "--recipe int8 --activations static"
        with pytest.raises(EdgevlError, match=rf"--precision {precision}: TensorRT {version}.* strongly typed"
                                              rf".*{recipe}.* with --precision graph"):
            _build(monkeypatch, version, precision, art)
        return
    build, _, _, _ = _build(monkeypatch, version, precision, art)
    assert build.network_flags == 0 and build.cleared_flags == []
    assert build.set_flags == (["FP16"] if precision == "fp16" else ["FP16", "INT8"])


@pytest.mark.parametrize("version", VERSIONS)
def test_runner_uses_only_this_versions_engine_and_context_api(version, art, monkeypatch):
    """EngineFromBytes + TrtRunner over this version's Runtime, ICudaEngine and IExecutionContext (the graph runs
    in onnxruntime): a prefill and a decode step give the same tokens as onnxruntime alone."""
    graph = art.graph(names.DECODER)
    profiles = sizing.build_profiles(names.DECODER, graph.spec.inputs, LIMITS, art.config)
    env = sizing.max_dims(names.DECODER, LIMITS, art.config)
    max_bytes = {v.name: sizing.max_tensor_bytes(v, env) for v in (*graph.spec.inputs, *graph.spec.outputs)}
    memory = HostMemory()
    api = surface(version)
    fake = fake_tensorrt(version, FakeBuild(), engine_factory=lambda blob: CheckedEngine(
        FakeEngine(graph.path, memory, profiles), api))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    runner = trt.TrtRunner(trt.EngineFromBytes(lambda: b"serialized engine"), profiles, max_bytes,
                           memory_factory=lambda: memory)
    runner.activate()
    cfg = art.config
    rng = np.random.default_rng(0)
    feed = {names.INPUTS_EMBEDS: rng.standard_normal((1, 5, cfg.hidden_size), np.float32),
            names.POSITION_IDS: np.tile(np.arange(5), (3, 1, 1)), names.ATTENTION_MASK: np.ones((1, 5), np.int64),
            **{v.name: np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
               for v in graph.spec.inputs if names.is_past(v.name)}}
    first = runner.infer(feed)
    step = {names.INPUTS_EMBEDS: feed[names.INPUTS_EMBEDS][:, -1:], names.POSITION_IDS: np.full((3, 1, 1), 5),
            names.ATTENTION_MASK: np.ones((1, 6), np.int64),
            **{names.past_name(i, k): first[names.present_name(i, k)]
               for i in range(cfg.num_hidden_layers) for k in names.KV_KINDS}}
    second = runner.infer(step)
    assert second[names.LOGITS].shape == (1, cfg.vocab_size) and np.isfinite(second[names.LOGITS]).all()
    runner.deactivate()


# ----------------------------------------------------------------------------- the names, statically
def _trt_attribute_chains() -> set[tuple[str, ...]]:
    """trt.X and trt.X.Y as written in trt.py (X: a module name, Y: an enum member or class attribute)."""
    tree = ast.parse(inspect.getsource(trt))
    chains = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt":
            chains.add((node.value.attr, node.attr))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            chains.add((node.attr,))
    return chains


GATED = {("BuilderFlag", "FP16"), ("BuilderFlag", "INT8")}     # reached through builder_flags' membership check


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_trt_py_writes_exists_in_this_version(version):
    api = surface(version)
    chains = _trt_attribute_chains()
    assert ("BuilderFlag", "__members__") in chains and ("Logger", "WARNING") in chains
    for chain in chains:
        assert chain[0] in api["module"] or chain[0].startswith("__"), (version, chain)
        if len(chain) == 2 and not chain[1].startswith("__"):
            known = api["enums"].get(chain[0]) or api["classes"].get(chain[0], [])
            assert chain[1] in known, (version, chain)
    for enum, member in GATED:                          # the gate matters: present on 10.x, gone on 11
        assert (member in api["enums"][enum]) == (_major(version) < 11)
    assert {"TF32"} <= set(api["enums"]["BuilderFlag"]) and "STRONGLY_TYPED" in api["enums"][
        "NetworkDefinitionCreationFlag"]
    assert {"FLOAT", "HALF", "INT32", "INT64", "BOOL", "INT8", "UINT8"} <= set(api["enums"]["DataType"])
    assert set(trt.TRT_DTYPES) <= set(api["enums"]["DataType"])


# ----------------------------------------------------------------------------- ONNX Runtime's TensorRT EP
def test_tensorrt_ep_options_exist_in_onnxruntime_gpu(art, monkeypatch, tmp_path):
    from edgevl.runtime.backends import probe
    monkeypatch.setattr(probe, "gpus", lambda: [probe.GpuInfo(0, "NVIDIA H100", (9, 0), 80 << 30)])
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.16.1")
    for precision in ("graph", "fp16", "int8"):
        opts = backends.BackendOptions(max_context=64, cache_dir=tmp_path, precision=precision)
        for kind in names.GRAPH_KINDS:
            runner = backends.make_ort_trt(art.graph(kind), opts)
            provider, options = runner.build_session.providers[0]
            assert provider == "TensorrtExecutionProvider"
            unknown = [k for k in options if k != "device_id" and k not in ORT_GPU["tensorrt_ep_options"]]
            assert not unknown, unknown
    links = ORT_GPU["links"]["tensorrt"]            # what the advice in runtime/backends/packages.py is about
    assert {"libnvinfer.so.10", "libnvonnxparser.so.10", "libcudart.so.13"} <= set(links)


# ----------------------------------------------------------------------------- engine cache keys
def test_engine_cache_key_is_stable_and_changes_with_every_input():
    base = dict(graph_sha="a" * 64, gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                trt_version="10.3.0", options={"precision": "graph", "profiles": [["decode", [["x", [1]]]]]})
    key = trt.engine_cache_key(**base)
    assert key == trt.engine_cache_key(**dict(base)) and len(key) == 32
    changes = [{"graph_sha": "b" * 64}, {"gpu_name": "Orin"}, {"compute_capability": (8, 7)},
               {"trt_version": "10.4.0"}, {"options": {**base["options"], "precision": "fp16"}},
               {"options": {**base["options"], "profiles": [["decode", [["x", [2]]]]]}}]
    assert len({trt.engine_cache_key(**{**base, **c}) for c in changes} | {key}) == len(changes) + 1


def test_graph_digest_and_build_options_key(art, tmp_path):
    digest = art.graph("decoder").digest
    assert digest == art.graph("decoder").digest != art.graph("vision").digest
    changed = Artifact(art.path, dataclasses.replace(art.manifest, files={**art.manifest.files,
                                                                          "decoder.onnx": "0" * 64}))
    assert changed.graph("decoder").digest != digest
    assert changed.graph("vision").digest == art.graph("vision").digest
    # a graph outside any artifact hashes its own files: the same digest as inside the artifact
    shutil.copy(art.graph_path("vision"), tmp_path / "vision.onnx")
    outside = GraphFile.standalone(tmp_path / "vision.onnx", art.manifest.graph("vision"), art.config)
    assert outside.digest == art.graph("vision").digest
    profiles = sizing.build_profiles("decoder", art.manifest.graph("decoder").inputs,
                                     sizing.Limits(max_context=64), art.config)
    assert trt.BuildOptions().key(profiles) != trt.BuildOptions("fp16").key(profiles)
    with pytest.raises(EdgevlError):
        trt.BuildOptions("int4")
    assert trt.trt_dtype_to_numpy("HALF") == np.float16 and trt.trt_dtype_to_numpy("INT64") == np.int64


def test_trt_runner_logic_over_a_stand_in_engine(standard_pipeline, photos, art):
    """TrtRunner's profiles, buffers and KV ping-pong, with TensorRT and CUDA replaced by stand-ins."""
    expected = greedy_tokens(standard_pipeline, photos["astronaut"])
    runners, memories = fake_trt_runners(art, sizing.Limits(max_context=512, max_image_patches=2048))
    with Swapped(standard_pipeline, runners["vision"], runners["decoder"]):
        assert greedy_tokens(standard_pipeline, photos["astronaut"]) == expected
    dec = runners["decoder"]
    assert dec.context.profiles_set == [1, 0]              # prefill profile, then decode for every new token
    kv_buffers = {p for out in dec.kv.values() for p in dec.buffers[out]}
    assert not [p for p in memories["decoder"].h2d_calls if p in kv_buffers]   # the cache never left the "GPU"
    for r in runners.values():
        r.deactivate()
    assert not memories["decoder"].blocks                  # every buffer freed


# ----------------------------------------------------------------------------- M-RoPE inlining
def test_inlined_decoder_has_no_functions_and_same_outputs(art, tmp_path):
    import onnx
    path = trt.inline_local_functions(art.graph_path("decoder"), tmp_path / "inlined", log=lambda m: None)
    model = onnx.load(str(path))
    assert not model.functions and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert "edgevl" not in {i.domain for i in model.opset_import}
    assert trt.inline_local_functions(art.graph_path("decoder"), tmp_path / "inlined") == path   # reused
    a = OnnxrtRunner(SessionFromOnnx(art.graph_path("decoder")))
    b = OnnxrtRunner(SessionFromOnnx(path))
    a.activate(), b.activate()
    rng = np.random.default_rng(1)
    kv, hd = art.config.num_key_value_heads, art.config.head_dim
    feed = {"inputs_embeds": rng.standard_normal((2, 3, art.config.hidden_size), np.float32),
            "position_ids": rng.integers(0, 50, (3, 2, 3)), "attention_mask": np.ones((2, 7), np.int64),
            **{n: rng.standard_normal((2, kv, 4, hd), np.float32) for n in a.input_metadata()
               if n.startswith("past_key_values.")}}
    assert compare_outputs(a.infer(feed), b.infer(feed), atol=1e-5)["ok"]
