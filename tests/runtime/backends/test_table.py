"""The backend table (runtime/backends/table.py) on a CPU-only machine: which backend is picked, clear errors instead of
fallbacks, the options and context limit each backend takes, and the engine backends' wiring up to TensorRT itself."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import probe, sizing


HAS_GPU = bool(probe.gpus())


@pytest.fixture
def only(monkeypatch):
    """only('ort-cuda', 'ort-cpu'): pretend exactly these backends are available."""
    def set_available(*names):
        for name, spec in backends.BACKENDS.items():
            verdict = (True, "") if name in names else (False, f"{name} needs something missing")
            monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(spec, available=lambda v=verdict: v))
    return set_available


# ----------------------------------------------------------------------------- selection and errors
def test_default_is_the_fastest_available(only):
    only("ort-cpu")
    assert backends.get_backend().name == "ort-cpu"
    only("ort-cuda", "ort-cpu")
    assert backends.get_backend().name == "ort-cuda"
    only("trt", "ort-trt", "ort-cuda", "ort-cpu")
    assert backends.get_backend().name == "trt"
    only("ort-trt", "ort-cpu")
    assert backends.get_backend(None).name == "ort-trt"


def test_unavailable_backend_is_a_clear_error_not_a_fallback(only):
    only("ort-cpu")
    with pytest.raises(EdgevlError, match="backend ort-cuda is not available here: ort-cuda needs something "
                                          "missing. Available here: ort-cpu."):
        backends.get_backend("ort-cuda")
    with pytest.raises(EdgevlError, match="unknown backend 'cuda'; choose one of trt, ort-trt, ort-cuda, ort-cpu"):
        backends.get_backend("cuda")
    only()
    with pytest.raises(EdgevlError, match="no backend can run here"):
        backends.get_backend()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_real_probes_name_what_is_missing_here():
    ok, reason = backends.available_ort_cuda()
    assert not ok and "libcuda.so.1" in reason
    ok, reason = backends.available_trt()
    assert not ok and "TensorRT" in reason
    assert backends.available_ort_cpu() == (True, "")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_run_with_an_unavailable_backend_exits_with_one_sentence(tiny_artifact):
    proc = subprocess.run([sys.executable, "-m", "edgevl", "run", str(tiny_artifact), "--prompt", "hi",
                           "--backend", "ort-cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "backend ort-cuda is not available here" in proc.stderr and "Traceback" not in proc.stderr


def test_backend_options_are_validated(art):
    with pytest.raises(EdgevlError, match="--max-context must be at least 1"):
        backends.BackendOptions(max_context=0)
    with pytest.raises(EdgevlError, match="above the model's context"):
        sizing.Limits.resolve(dataclasses.replace(art.config, max_position_embeddings=100), max_context=200)


def test_context_limit(only, art):
    only("ort-cpu", "trt")
    assert backends.get_backend("ort-cpu").context_limit(art.config) == art.config.max_position_embeddings
    opts = backends.BackendOptions(max_context=300)
    assert backends.get_backend("ort-cpu", opts).context_limit(art.config) == 300
    assert backends.get_backend("trt").context_limit(art.config) == sizing.DEFAULT_ENGINE_CONTEXT


def test_engine_backends_wiring_without_tensorrt(monkeypatch, art, tmp_path):
    """ort-trt and trt up to the point where TensorRT itself is needed: inlining, options, cache paths."""
    gpu = probe.GpuInfo(0, "NVIDIA Jetson Orin", (8, 7), 8 << 30)
    monkeypatch.setattr(probe, "gpus", lambda: [gpu])
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.3.0")
    opts = backends.BackendOptions(max_context=128, cache_dir=tmp_path)
    runner = backends.make_ort_trt(art.graph("decoder"), opts)                 # session built lazily
    trt_opts = dict(runner.build_session.providers[0][1])
    assert runner.build_session.path.parent.parent == tmp_path / "inlined"         # the MRoPE-free copy
    assert trt_opts["trt_engine_cache_path"].startswith(str(tmp_path / "ort-trt" / "decoder-"))
    assert "attention_mask:1x128" in trt_opts["trt_profile_max_shapes"]
    assert backends.make_ort_trt(art.graph("vision"), opts).build_session.path == art.graph_path("vision")
    cache, profiles, max_bytes = backends.trt_engine_loader(art.graph("decoder"), opts)
    assert cache.path.parent == tmp_path / "trt" and [p.name for p in profiles] == ["decode", "prefill", "extend"]
    assert max_bytes["logits"] == art.config.vocab_size * 4
    other, _, _ = backends.trt_engine_loader(art.graph("decoder"), dataclasses.replace(opts, max_context=256))
    assert other.path != cache.path
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.4.0")
    assert backends.trt_engine_loader(art.graph("decoder"), opts)[0].path != cache.path
    with pytest.raises(EdgevlError, match="--device 3: this machine has 1 GPU"):
        backends.trt_engine_loader(art.graph("decoder"), dataclasses.replace(opts, device_id=3))


def test_engine_backends_load_one_graph_at_a_time():
    # building two TensorRT engines at once doubles the builder's GPU memory
    assert not backends.BACKENDS["trt"].concurrent_load and not backends.BACKENDS["ort-trt"].concurrent_load
    assert backends.BACKENDS["ort-cpu"].concurrent_load and backends.BACKENDS["ort-cuda"].concurrent_load
