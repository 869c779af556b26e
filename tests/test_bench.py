"""`edgevl bench`: statistics and roofline arithmetic, prompt fitting, presets, and smoke runs on the tiny model."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgevl.bench import stats
from edgevl.bench.compute import decoder_flops, measure_gemm, vision_flops
from edgevl.cli.bench import add_parser as add_bench_parser
from edgevl.cli.bench import run as cmd_bench
from edgevl.errors import EdgevlError

STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *map(str, argv)])


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("values", [[3.0], [5, 1, 4, 2], list(range(11)), [0.5, 9.25, 7.0, 7.0, 1.5, 100.0]])
def test_percentiles_match_numpy(values):
    for q in (0, 10, 50, 90, 100):
        assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))
    s = stats.summarize(values)
    assert s["median"] == pytest.approx(np.median(values))
    assert s["p90"] == pytest.approx(np.percentile(values, 90))
    assert s["min"] == min(values) and s["max"] == max(values) and s["n"] == len(values)


def test_summary_edge_cases():
    assert stats.summarize([]) is None
    assert math.isnan(stats.percentile([], 50))
    assert stats.summarize([1, 2, 3, 4, 100])["median"] == 3           # the median ignores the outlier
    with pytest.raises(ValueError):
        stats.percentile([1], 101)
    assert stats.ratio(50.0, 100.0) == 0.5
    assert stats.ratio(None, 1.0) is None and stats.ratio(1.0, 0.0) is None and stats.ratio(1.0, None) is None
    assert stats.tokens_per_second(20.0) == 50.0 and stats.tokens_per_second(None) is None
    assert stats.median_by_key([(5, 1.0), (3, 2.0), (5, 3.0), (5, 10.0)]) == [(3, 2.0), (5, 3.0)]


def test_kv_cache_bytes(tiny_artifact):
    import dataclasses

    from edgevl.artifact import load_artifact
    # Qwen2-VL-2B at 1000 tokens of context, fp32: 28 layers x K and V x 2 heads x 128 dims x 4 bytes per token.
    config = dataclasses.replace(load_artifact(tiny_artifact).config, num_hidden_layers=28, num_key_value_heads=2,
                                 head_dim=128)
    assert config.kv_cache_bytes(1, 1000, 4) == 2 * 28 * 2 * 128 * 1000 * 4
    assert config.kv_cache_bytes(3, 1000, 4) == 3 * config.kv_cache_bytes(1, 1000, 4)


def test_roofline_arithmetic():
    assert stats.tensor_bytes([1536, 8960], "float32") == 1536 * 8960 * 4
    assert stats.tensor_bytes([1536, 8960], "float16") == 1536 * 8960 * 2
    assert stats.tensor_bytes([3, 5], "int4") == 8                      # 15 nibbles -> 8 bytes
    assert stats.tensor_bytes([], "float32") == 4                       # a scalar
    with pytest.raises(ValueError):
        stats.tensor_bytes([2], "complex64")
    total = stats.decode_bytes_per_token(1_000_000_000, 6144, 57_344_000)
    assert total == 1_057_350_144
    assert stats.floor_ms(total, 20e9) == pytest.approx(total / 20e9 * 1e3)   # ~52.9 ms at 20 GB/s
    assert stats.floor_ms(total, 0) is None
    assert stats.bandwidth(1e9, 0.05) == 2e10 and stats.bandwidth(1, 0) == math.inf


def test_the_four_stream_read_reads_every_pair_of_sub_chunks():
    from edgevl.bench.machine import STREAMS, _read_as_streams
    chunk = np.arange(4 * 1000, dtype=np.float64)
    parts = np.array_split(chunk, STREAMS)
    assert _read_as_streams(chunk) == float(parts[0] @ parts[1] + parts[2] @ parts[3])


# ----------------------------------------------------------------------------- pieces
@pytest.fixture(scope="module")
def tiny_2_5_dir(tmp_path_factory):
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("tiny25") / "model", preset="tiny-2.5")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grid", [(1, 8, 12), (2, 4, 6), (1, 10, 14)])
def test_flop_counts_equal_torch_flop_counter_on_the_transformers_model(family, grid, request):
    # eager attention: torch's counter sees every matrix product as mm/bmm (its sdpa rule counts differently);
    # Qwen2.5-VL's eager vision attention runs window by window, so partial windows count as they are
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from edgevl.bench.reference import model_class
    from edgevl.export.exporter import model_facts
    model_dir = request.getfixturevalue("tiny_model_dir" if family == "qwen2_vl" else "tiny_2_5_dir")
    config = model_facts(AutoConfig.from_pretrained(model_dir), {})
    model = model_class(family).from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    pixels = torch.randn(int(np.prod(grid)), 3 * config.temporal_patch_size * config.patch_size ** 2)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixels, torch.tensor([grid]))
    assert counter.get_total_flops() == vision_flops(config, grid)
    ids = torch.randint(0, 100, (1, 37))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == decoder_flops(config, 37)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids[:, :1], cache=out.cache, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == decoder_flops(config, 1, past=37)


def test_gemm_rate_is_measured_for_fp32_and_int8():
    gemm = measure_gemm(threads=1, shape=(64, 128, 256), repeats=2)
    assert gemm["fp32_flops_per_s"] > 1e6 and gemm["int8_flops_per_s"] > 1e6
    assert gemm["shape"] == [64, 128, 256] and "not the hardware peak" in gemm["method"]


def test_fit_prompt_reaches_the_target_length():
    from edgevl.bench.measure import fit_prompt
    overhead = 20                                               # template + image tokens of the fake model

    def count(text):                                            # one token per word
        return overhead + len(text.split())
    text = fit_prompt(count, lambda t: t.split(), lambda ids: " ".join(ids), 64, base="Describe it.")
    assert count(text) == 64 and text.startswith("Describe it.")
    assert fit_prompt(count, str.split, " ".join, None, base="Hi") == "Hi"
    assert fit_prompt(count, str.split, " ".join, 22, base="Describe it in detail.") == "Describe it"
    with pytest.raises(EdgevlError, match="shorter than the 21 tokens"):
        fit_prompt(count, str.split, " ".join, 20, base="Hi there")


def test_size_parsing_and_synthetic_image(tmp_path):
    from PIL import Image

    from edgevl.bench.measure import parse_size, synthetic_image
    assert parse_size("1344x756") == (1344, 756)
    for bad in ("448", "axb", "0x10"):
        with pytest.raises(EdgevlError, match="--image-size"):
            parse_size(bad)
    path = synthetic_image(60, 40, tmp_path)
    with Image.open(path) as img:
        assert img.size == (60, 40) and img.mode == "RGB"
    assert synthetic_image(60, 40, tmp_path).read_bytes() == path.read_bytes()


def test_graph_weight_bytes_counts_every_initializer(tiny_artifact):
    import onnx
    from onnx import numpy_helper

    from edgevl.artifact import load_artifact
    from edgevl.bench.measure import graph_weight_bytes
    graph = load_artifact(tiny_artifact).graph("decoder")
    model = onnx.load(str(graph.path))
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    expected += sum(numpy_helper.to_array(a.t).nbytes for n in model.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value")
    counted = graph_weight_bytes(graph)
    assert counted["bytes"] == expected and counted["bytes"] > 64 * 2014 * 4   # at least lm_head


def test_page_cache_warming_reads_every_file(tiny_artifact):
    from edgevl.bench.machine import warm_page_cache
    assert warm_page_cache(tiny_artifact) == sum(p.stat().st_size for p in tiny_artifact.rglob("*") if p.is_file())


def test_loads_after_warm_up_are_measured_and_the_last_engine_kept(tmp_path):
    from edgevl.bench.measure import load_engine
    made, closed = [], []

    class Fake:
        def __init__(self):
            self.load_s = 0.1 * (len(made) + 1)
            made.append(self)

        def close(self):
            closed.append(self)

    engine = load_engine(Fake, tmp_path, warmup=1, runs=3)
    assert len(made) == 4 and engine is made[-1] and closed == made[:-1]
    assert engine.load_times == pytest.approx([0.2, 0.3, 0.4])


def test_peak_rss_sees_an_allocation():
    from edgevl.bench.machine import PeakRSS
    import mmap
    with PeakRSS() as m:
        # 64 MiB of fresh pages, every one touched: an anonymous map, because a numpy array of that size may reuse
        # heap memory that earlier tests freed and glibc kept resident (then RSS does not grow at all)
        block = mmap.mmap(-1, 64 << 20)
        np.frombuffer(block, np.uint8)[:] = 1
        block.close()
    assert m.peak - m.before >= 60 << 20


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *name,driver_version,memory.total*) echo "NVIDIA H100 80GB HBM3, 550.54.15, 81559" ;;
  *) echo 1000; echo 1500; echo 1200; exec sleep 30 ;;
esac
"""


def test_gpu_memory_is_sampled_with_nvidia_smi_and_skipped_without(tmp_path, monkeypatch):
    from edgevl.bench.machine import GpuMemory, gpu_info
    monkeypatch.setenv("PATH", str(tmp_path))                  # no nvidia-smi on the PATH
    with GpuMemory() as gpu:
        pass
    assert gpu.to_json() == {"peak_mb": None, "before_mb": None, "skipped": "no NVIDIA GPU (nvidia-smi not found)"}
    assert gpu_info() == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with GpuMemory(interval_ms=20) as gpu:
        pass
    assert gpu.to_json() == {"peak_mb": 1500.0, "before_mb": 1000.0, "skipped": None}
    assert gpu_info() == [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559.0, "driver": "550.54.15"}]


def test_preset_is_built_once_and_reused(tiny_artifact, tmp_path, monkeypatch):
    import edgevl.export.exporter as exporter
    import edgevl.synthetic.random_model as tiny_model
    from edgevl.bench.preset_cache import ensure_preset
    calls = []

    def fake_model(out, preset, seed):
        calls.append(("model", preset))
        (out / "config.json").write_text("{}")

    def fake_export(model, out, dtype, force, log):
        calls.append(("export", dtype))
        shutil.rmtree(out, ignore_errors=True)                 # force=True
        shutil.copytree(tiny_artifact, out)
        return out

    monkeypatch.setenv("EDGEVL_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "write_random_model", fake_model)
    monkeypatch.setattr(exporter, "export_model", fake_export)
    first = ensure_preset("tiny", log=lambda msg: None)
    assert first == tmp_path / "presets" / "tiny" / "export-fp32" and (first / "manifest.json").exists()
    assert (tmp_path / "presets" / "tiny" / "model" / "config.json").exists()
    assert ensure_preset("tiny", log=lambda msg: None) == first
    assert calls == [("model", "tiny"), ("export", "fp32")]    # the second call built nothing
    # An export made by other exporter code (another stamp, or none) is made again, and what was quantized
    # from it goes; other folders stay.
    quantized, images = first.parent / "export-w4a16", first.parent / "vision-scaling-images"
    shutil.copytree(first, quantized)
    images.mkdir()
    other_dtype = first.parent / "export-fp16"                 # another dtype's export, current: kept
    shutil.copytree(first, other_dtype)
    shutil.copy(first.parent / "export-fp32.exporter", first.parent / "export-fp16.exporter")
    (first.parent / "export-fp32.exporter").write_text("0123456789abcdef\n")
    said = []
    assert ensure_preset("tiny", log=said.append) == first and (first / "manifest.json").exists()
    assert calls[2:] == [("export", "fp32")] and not quantized.exists() and images.is_dir() and other_dtype.is_dir()
    assert said[0] == ("the cached tiny export was made by other exporter code: exporting again (removed "
                       "export-w4a16, made from it)")
    assert ensure_preset("tiny", log=lambda msg: None) == first and len(calls) == 3
    with pytest.raises(EdgevlError, match="unknown preset"):
        ensure_preset("qwen2-vl-1b", log=lambda msg: None)


# ----------------------------------------------------------------------------- the command
def test_bench_with_reference_on_the_tiny_model(tiny_artifact, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    args = bench_args(tiny_artifact, "--image-size", "56x56", "none", "--new-tokens", "4", "--runs", "1",
                      "--warmup", "0", "--reference", "hf", "--decode-contexts", "16", "40", "--bandwidth-mib", "8",
                      "--json", out_json, "--plot", out_png, "--markdown", out_md, "--no-progress")
    assert cmd_bench(args) == 0
    table = capsys.readouterr().out
    assert "edgevl/hf" in table and "transformers" in table and "memory bandwidth" in table

    report = json.loads(out_json.read_text())
    assert report["schema"] == "edgevl-bench/1"
    from edgevl.artifact import load_artifact
    config = load_artifact(tiny_artifact).config
    m = report["machine"]
    assert m["cpu_model"] and m["logical_cores"] >= 1 and m["ram_bytes"] > 0 and isinstance(m["gpus"], list)
    assert {"edgevl", "numpy", "onnxruntime", "torch", "transformers"} <= set(m["versions"])
    bw = report["bandwidth"]
    assert bw["bytes_per_s"] == max(bw["start"]["best_bytes_per_s"], bw["end"]["best_bytes_per_s"]) > 1e8
    for probe in (bw["start"], bw["end"]):     # the best of the one-stream sums, the four-stream read and the copy
        reads = [probe[k] for k in ("read_1thread_bytes_per_s", "read_all_threads_bytes_per_s",
                                    "read_streams_bytes_per_s")]
        assert min(reads) > 0 and probe["best_bytes_per_s"] == max(*reads, probe["copy_bytes_per_s"])
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert len(row["artifact"]["manifest_sha256"]) == 64 and row["artifact"]["dtype"] == "fp32"
        assert row["artifact"]["precision"]["decoder"] == "fp32"
        has_image = row["workload"]["image"] != "none"
        for side in (row["edgevl"], row["reference"]):
            assert side["load_s"] > 0 and side["peak_rss_bytes"] > 0
            for stage in STAGES:
                if stage == "vision_ms" and not has_image:
                    assert side["stages"][stage] is None
                    continue
                s = side["stages"][stage]
                assert s["median"] > 0 and s["min"] <= s["median"] <= s["p90"], (side["engine"], stage)
            assert side["stages"]["decode_ms_per_token"]["n"] == 3  # 4 tokens: 1 from prefill + 3 decode steps
            assert side["tokens_per_s"] > 0 and len(side["decode_by_context"]) == 3
            assert side["gpu_memory"]["skipped"] or side["gpu_memory"]["peak_mb"] is not None
        assert row["tokens_match"] == {"same_prompt_ids": True, "matching_prefix": 4, "of": 4}   # fp32: greedy equal
        assert row["ratios"]["decode_ms_per_token"] > 0 and (row["ratios"]["vision_ms"] is None) != has_image
        roof = row["roofline"]
        assert roof["weight_bytes"] > 0 and roof["embedding_row_bytes"] == 64 * 4
        assert roof["floor_ms"] > 0 and roof["decode_over_floor"] > 0
        c = row["compute"]
        assert c["prefill_flops"] == decoder_flops(config, row["workload"]["prompt_tokens"])
        assert c["grid"] == ([1, 4, 4] if has_image else None)
        assert (c["vision_flops"] == vision_flops(config, (1, 4, 4))) if has_image else c["vision_flops"] is None
        for key in ("edgevl", "reference"):
            assert c[f"{key}_prefill_flops_per_s"] > 0 and c[f"{key}_prefill_of_gemm_rate"] > 0
            assert c[f"{key}_prefill_gemm_rate"] == "fp32"
            assert (c[f"{key}_vision_of_gemm_rate"] > 0) if has_image else c[f"{key}_vision_flops_per_s"] is None
    assert report["gemm"]["fp32_flops_per_s"] > 1e8 and report["gemm"]["int8_flops_per_s"] > 1e8
    assert "compute-bound stages against the measured GEMM rate" in out_md.read_text()
    assert {p["engine"] for p in report["context_probes"]} == {"edgevl", "transformers"}
    assert {c for p in report["context_probes"] for c, _ in p["points"]} == {16, 40}

    assert out_png.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image
    with Image.open(out_png) as img:
        assert img.size[0] > 500 and img.size[1] > 300
    assert out_md.read_text().count("| edgevl/hf |") == 2


def test_interleaved_runs_measure_both_engines(tiny_artifact, tmp_path, capsys):
    args = bench_args(tiny_artifact, "--image-size", "none", "--new-tokens", "3", "--runs", "2", "--warmup", "0",
                      "--reference", "hf", "--interleave", "--threads", "1", "--bandwidth-mib", "8",
                      "--json", tmp_path / "r.json", "--no-progress")
    assert cmd_bench(args) == 0
    assert "runs interleaved" in capsys.readouterr().out
    row, = json.loads((tmp_path / "r.json").read_text())["rows"]
    for side in (row["edgevl"], row["reference"]):
        assert len(side["runs"]) == 2 and side["peak_rss_shared"] and side["threads"] == 1
        assert side["load"]["n"] == 2 and side["load_s"] == side["load"]["median"]   # one load per run
        assert side["stages"]["ttft_ms"]["median"] > 0
    assert row["ratios"]["peak_rss_delta"] is None and row["ratios"]["ttft_ms"] > 0
    assert row["tokens_match"]["matching_prefix"] == 3


def test_fast_load_is_measured_without_weight_prepacking(tiny_artifact, tmp_path, capsys, monkeypatch):
    from edgevl.runtime.backends import ort_session
    made = []
    real = ort_session.SessionFromOnnx.__call__
    monkeypatch.setattr(ort_session.SessionFromOnnx, "__call__", lambda self: made.append(self.prepack) or real(self))
    args = bench_args(tiny_artifact, "--image-size", "none", "--new-tokens", "2", "--runs", "1", "--warmup", "0",
                      "--fast-load", "--bandwidth-mib", "8", "--json", tmp_path / "r.json", "--no-progress")
    assert cmd_bench(args) == 0
    assert "--fast-load (no weight pre-packing)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["fast_load"] is True
    assert made == [False, False]           # vision and decoder sessions


def test_bench_runs_standalone_and_from_a_preset(tiny_artifact, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_artifact, cache / "presets" / "tiny" / "export-fp32")   # a cached preset export
    env = {**os.environ, "EDGEVL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "edgevl", "bench", "--preset", "tiny", "--runs", "1", "--warmup", "0",
           "--new-tokens", "2", "--image-size", "none", "--bandwidth-mib", "8", "--json", tmp_path / "r.json"]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "random weights (preset tiny)" in proc.stdout and "tiny (fp32)" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"][0]["artifact"]["preset"] == "tiny" and report["rows"][0]["reference"] is None


@pytest.mark.parametrize("argv, fragment", [
    ([], "OUT or --preset"),
    (["{missing}"], "is not a folder"),
    (["{art}", "--new-tokens", "1"], "--new-tokens"),
    (["{art}", "--image-size", "big"], "--image-size"),
    (["{art}", "--backend", "tpu"], "unknown backend"),
    (["{art}", "--image", "{missing}"], "does not exist"),
    (["{art}", "--interleave"], "needs --reference hf"),
])
def test_bad_input_is_one_sentence(argv, fragment, tiny_artifact, tmp_path):
    argv = [a.format(art=tiny_artifact, missing=tmp_path / "nope") for a in argv]
    proc = subprocess.run([sys.executable, "-m", "edgevl", "bench", *argv, "--bandwidth-mib", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[bench]")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and fragment in lines[0], proc.stderr


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    for action in sub.choices["bench"]._actions:
        assert action.help, f"bench {action.option_strings or action.dest} has no help"
