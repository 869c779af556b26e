"""`edgevl bench` (bench/suite.py, cli/bench.py): smoke runs on the tiny model with transformers as the reference,
interleaved runs, --fast-load, standalone and preset runs, bad input as one sentence, and help for every option."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from edgevl.bench.compute import decoder_flops, vision_flops
from edgevl.cli.bench import add_parser as add_bench_parser
from edgevl.cli.bench import run as cmd_bench


STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *map(str, argv)])


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
