"""`edgevl bench --reference llama.cpp openvino` (bench/peers/__init__.py) without the peers installed: the sentences a
user gets when a peer is not set up, a peer's row in the report end to end (a stand-in module measuring from a captured
log), and a failing peer's row marked while the report is still written. The peers themselves run in the benchmark,
not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from edgevl.bench.peers import llama_cpp
from edgevl.errors import EdgevlError
from tests.bench.peers import MTMD_LOG, STAGES, fake_setup


# ----------------------------------------------------------------------------- not set up
@pytest.mark.parametrize("peer", ["llama.cpp", "openvino"])
def test_a_peer_not_set_up_is_one_sentence_naming_make_bench_peers(peer, tiny_artifact, tmp_path):
    env = {**os.environ, "EDGEVL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "edgevl", "bench", str(tiny_artifact), "--reference", "hf", peer,
                           "--bandwidth-mib", "8"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--reference {peer} needs the {peer} peer" in proc.stderr and "`make bench-peers`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_broken_or_incomplete_setup_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVL_CACHE", str(tmp_path))
    folder = tmp_path / "peers" / "llama.cpp"
    folder.mkdir(parents=True)
    (folder / "ready.json").write_text("{not json")
    with pytest.raises(EdgevlError, match="unreadable: run `make bench-peers`"):
        llama_cpp.setup()
    (folder / "ready.json").write_text(json.dumps({"paths": {k: str(tmp_path / k) for k in llama_cpp.REQUIRED}}))
    with pytest.raises(EdgevlError, match=r"incomplete \(python, source, mtmd_cli, quantize, bench missing\)"):
        llama_cpp.setup()
    for k in llama_cpp.REQUIRED:
        (tmp_path / k).write_text("")
    assert llama_cpp.setup().path("mtmd_cli") == tmp_path / "mtmd_cli"
    with pytest.raises(EdgevlError, match="--reference takes hf, llama.cpp, openvino, not 'vllm'"):
        from edgevl.bench.suite import BenchConfig, check_config
        check_config(BenchConfig(artifacts=[tmp_path], reference=["hf", "vllm"]))


# ----------------------------------------------------------------------------- a peer row, end to end
def test_peer_rows_in_the_report(tiny_artifact, tmp_path, monkeypatch, capsys):
    """run_bench with a stand-in llama.cpp module (its measurements from the captured log): the peer is
    given edgevl's prompt text and image, and its row has side_json's keys, ratios and its identity."""
    from edgevl.bench import peers
    from edgevl.bench.plot import write_plot
    from edgevl.bench.report import render_text
    from edgevl.bench.suite import BenchConfig, run_bench
    seen = []
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 1000)

    def measure(setup, source, variant, image, prompt, new_tokens, runs, warmup, threads, tick, log):
        seen.append((source, image, prompt, new_tokens))
        for _ in range(runs + warmup):
            tick("fake")
        return {"runs": [llama_cpp.stage_times(llama_cpp.parse_output(MTMD_LOG))] * runs, "load_times": [1.3] * runs,
                "peak_rss": 5 << 20, "files": [str(gguf)], "command": "llama-mtmd-cli ...", "prompt_tokens": 289}
    fake = types.SimpleNamespace(setup=lambda: fake_setup(tmp_path), variants=llama_cpp.variants, measure=measure)
    monkeypatch.setattr(peers, "module", lambda name: fake)
    report = run_bench(BenchConfig(artifacts=[tiny_artifact], image_sizes=["56x56", "none"], new_tokens=[4], runs=2,
                                   warmup=0, reference=["llama.cpp"], bandwidth_mib=8, progress=False))
    with_image, text_only = report["rows"]
    assert text_only["peers"] == [] and len(seen) == 1          # the peers are driven with an image
    _, image, prompt, new_tokens = seen[0]
    assert image.name == "synthetic-56x56.png" and new_tokens == 4 and prompt == "Describe this image in detail."
    peer = with_image["peers"][0]
    assert set(with_image["edgevl"]) <= set(peer)                # every key side_json gives the other engines
    assert {"peer", "variant", "settings", "files", "on_disk_bytes", "command", "per_step_decode", "exposes",
            "ratios"} <= set(peer)
    assert (peer["peer"], peer["variant"], peer["on_disk_bytes"], peer["prompt_tokens"]) == \
        ("llama.cpp", "F32 (+F32 mmproj)", 1000, 289)
    assert tuple(peer["stages"]) == STAGES and peer["stages"]["preprocess_ms"] is None
    assert peer["exposes"] == ["vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms"]
    assert peer["decode_by_context"] == [] and peer["load_s"] == 1.3
    assert peer["ratios"]["vision_ms"] == pytest.approx(with_image["edgevl"]["stages"]["vision_ms"]["median"] / 845.0)
    assert peer["ratios"]["preprocess_ms"] is None
    assert report["peers"]["llama.cpp"]["versions"] == {"tool": "1.0"} and report["settings"]["reference"] == ["llama.cpp"]
    assert with_image["artifact"]["on_disk_bytes"] > 0
    json.dumps(report)

    text = render_text(report)
    assert "engines side by side" in text and "llama.cpp F32 (+F32 mmproj)" in text and "edgevl/llama.cpp" in text
    assert "peer llama.cpp: tool 1.0; test build" in text
    md = render_text(report, markdown=True)
    assert "| image 56x56, " in md and "| llama.cpp F32 (+F32 mmproj) |" in md
    write_plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


def test_a_failing_peer_leaves_its_row_marked_and_the_report_is_written(tiny_artifact, tmp_path, monkeypatch):
    """One peer fails (its tool crashed), the other measures: run_bench finishes, the failed configuration is in the
    row with its reason and settings, the measured one has its numbers, and every rendering shows both."""
    from edgevl.bench import peers
    from edgevl.bench.plot import write_plot
    from edgevl.bench.report import render_text
    from edgevl.bench.suite import BenchConfig, run_bench
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 10)

    def crashing(*args, **kwargs):
        raise EdgevlError("llama-mtmd-cli failed (exit status -11): no output")

    def working(setup, source, variant, image, prompt, new_tokens, runs, warmup, threads, tick, log):
        return {"runs": [llama_cpp.stage_times(llama_cpp.parse_output(MTMD_LOG))] * runs, "load_times": [1.0] * runs,
                "peak_rss": 1 << 20, "files": [str(gguf)], "command": "ov", "prompt_tokens": 289,
                "settings": {"effective": "f32"}}
    modules = {"llama.cpp": types.SimpleNamespace(setup=lambda: fake_setup(tmp_path), variants=llama_cpp.variants,
                                                  measure=crashing),
               "openvino": types.SimpleNamespace(setup=lambda: fake_setup(tmp_path, "openvino"),
                                                 variants=lambda p: [{"label": "fp32, f32 precision", "settings": {}}],
                                                 measure=working)}
    monkeypatch.setattr(peers, "module", modules.__getitem__)
    logs = []
    report = run_bench(BenchConfig(artifacts=[tiny_artifact], image_sizes=["56x56"], new_tokens=[2], runs=1, warmup=0,
                                   reference=["llama.cpp", "openvino"], bandwidth_mib=8, progress=False), log=logs.append)
    (row,) = report["rows"]
    assert [p["peer"] for p in row["peers"]] == ["openvino"] and row["peers"][0]["settings"] == {"effective": "f32"}
    (failed,) = row["peer_failures"]
    assert failed["peer"] == "llama.cpp" and "exit status -11" in failed["failed"]
    assert failed["settings"]["kv_cache"].startswith("f16")
    assert any("failed, its row is marked" in line for line in logs)
    json.dumps(report)
    for markdown in (False, True):
        text = render_text(report, markdown=markdown)
        assert "llama.cpp F32 (+F32 mmproj)" in text and "failed" in text
        assert "FAILED: llama-mtmd-cli failed (exit status -11)" in text and "ran with effective f32" in text
    write_plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
