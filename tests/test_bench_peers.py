"""`edgevl bench --reference llama.cpp openvino` without the peers installed: parsing of their real
output (captured in tests/data/peers/), command building, the peer row's schema, and the sentences a
user gets when a peer is not set up. The peers themselves run in the benchmark, not here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgevl.bench.peers import driver, llama_cpp, openvino
from edgevl.errors import EdgevlError

DATA = Path(__file__).parent / "data" / "peers"
MTMD_LOG = (DATA / "llama-mtmd-cli-q8_0.stderr.txt").read_text()
STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")


def fake_setup(tmp_path: Path, name: str = "llama.cpp") -> driver.PeerSetup:
    keys = ("python", "source", "mtmd_cli", "quantize", "bench", "optimum_cli")
    return driver.PeerSetup(name, tmp_path, {"paths": {k: f"/peer/{k}" for k in keys},
                                             "versions": {"tool": "1.0"}, "build": "test build"})


# ----------------------------------------------------------------------------- llama.cpp
def test_llama_cpp_log_is_parsed_into_stages():
    parsed = llama_cpp.parse_output(MTMD_LOG)
    assert parsed == {"vision_ms": 845.0, "image_decode_ms": 269.0, "prompt_eval_ms": 1171.54, "prompt_tokens": 289,
                      "eval_ms": 370.28, "eval_runs": 31, "load_s": pytest.approx(1.301585)}
    stages = llama_cpp.stage_times(parsed)
    # the prompt timer spans the image encode: prefill is what is left of it
    assert stages["vision_ms"] == 845.0 and stages["prefill_ms"] == pytest.approx(1171.54 - 845.0)
    assert stages["ttft_ms"] == pytest.approx(1171.54) and stages["preprocess_ms"] is None
    assert stages["decode_ms"] == [pytest.approx(370.28 / 31)] * 31
    assert stages["e2e_ms"] == pytest.approx(1171.54 + 370.28)


def test_llama_cpp_prompt_timer_that_excludes_the_encode_is_taken_as_is():
    text = MTMD_LOG.replace("prompt eval time =    1171.54 ms", "prompt eval time =     500.00 ms")
    stages = llama_cpp.stage_times(llama_cpp.parse_output(text))
    assert stages["prefill_ms"] == 500.0 and stages["ttft_ms"] == 845.0 + 500.0


def test_llama_cpp_log_without_timings_is_one_sentence():
    with pytest.raises(EdgevlError, match="no llama_perf timings"):
        llama_cpp.parse_output("main: loading model: x.gguf\nmtmd batch encoding done in 3 ms\n")


def test_llama_bench_json_is_parsed_per_repetition():
    points = llama_cpp.parse_bench((DATA / "llama-bench-q8_0.json").read_text())
    tests = json.loads((DATA / "llama-bench-q8_0.json").read_text())
    assert [c for c, _ in points] == [512, 512, 4096, 4096]
    assert points[0][1] == pytest.approx(tests[0]["samples_ns"][0] / 4 / 1e6)
    with pytest.raises(EdgevlError, match="no JSON"):
        llama_cpp.parse_bench("| model | size |")


def test_llama_cpp_commands(tmp_path, tiny_model_dir):
    setup = fake_setup(tmp_path)
    cmd = list(map(str, llama_cpp.command(setup, Path("m.gguf"), Path("mm.gguf"), Path("i.png"), "Describe.", 32)))
    assert cmd[0] == "/peer/mtmd_cli" and cmd[cmd.index("-n") + 1] == "32" and cmd[cmd.index("-p") + 1] == "Describe."
    for flag in ("--jinja", "--ignore-eos", "--perf"):
        assert flag in cmd
    assert cmd[cmd.index("--temp") + 1] == "0" and cmd[cmd.index("-lv") + 1] == "4" and "-t" not in cmd
    assert llama_cpp.command(setup, "m", "mm", "i", "p", 8, threads=2)[-2:] == ["-t", "2"]

    conv = list(map(str, llama_cpp.convert_command(setup, tiny_model_dir, Path("out.gguf"), "F16", mmproj=True)))
    assert conv[:3] == ["/peer/python", str(llama_cpp.CONVERTER), "/peer/source"]
    assert conv[3:6] == ["--pre-tokenizer", "qwen2", "--"]      # the stand-in tokenizer splits as Qwen2's
    assert conv[6:] == [str(tiny_model_dir), "--mmproj", "--outtype", "f16", "--outfile", "out.gguf"]
    bench = list(map(str, llama_cpp.bench_command(setup, Path("m.gguf"), [512, 4096], threads=2)))
    assert bench[bench.index("-d") + 1] == "512,4096" and bench[bench.index("-p") + 1] == "0" and "json" in bench

    assert [v["label"] for v in llama_cpp.variants("w4a16")] == ["Q4_0 (+F16 mmproj)"]
    assert [v["label"] for v in llama_cpp.variants("int8")] == ["Q8_0 (+F32 mmproj)"]
    assert [v["label"] for v in llama_cpp.variants("fp32")] == ["F32 (+F32 mmproj)"]


def test_pre_tokenizer_is_qwen2_only_for_qwen2_splitting(tiny_model_dir, tmp_path):
    assert llama_cpp.pre_tokenizer(tiny_model_dir) == "qwen2"
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert llama_cpp.pre_tokenizer(tmp_path) is None
    assert llama_cpp.pre_tokenizer(tmp_path / "missing") is None


def test_gguf_convert_wrapper_names_an_unknown_pre_tokenizer_without_editing_the_converter(tmp_path):
    """A stand-in for the vendored converter: the same module layout, a hash check that refuses."""
    root = tmp_path / "llama.cpp"
    (root / "conversion").mkdir(parents=True)
    (root / "gguf-py").mkdir()
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized - update get_vocab_base_pre()')\n")
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom conversion.base import TextModel\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(TextModel().get_vocab_base_pre(None))\n")
    out = tmp_path / "out.txt"
    run = [sys.executable, str(llama_cpp.CONVERTER), str(root)]
    proc = subprocess.run([*run, "--pre-tokenizer", "qwen2", "--", "model", "--outfile", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "qwen2" and "using pre-tokenizer 'qwen2'" in proc.stderr
    proc = subprocess.run([*run, "--", "model", "--outfile", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not recognized" in proc.stderr     # without the flag: the converter's own check


# ----------------------------------------------------------------------------- OpenVINO
def test_openvino_driver_output_is_parsed_into_ttft_and_decode():
    result = openvino.parse_result((DATA / "openvino-driver-fp32.stdout.txt").read_text())
    assert len(result["runs"]) == 2 and result["effective_properties"]["INFERENCE_PRECISION_HINT"] == "bf16"
    stages = openvino.stage_times(result["runs"][0])
    assert stages["ttft_ms"] == result["runs"][0]["ttft_ms"] and len(stages["decode_ms"]) == 31
    assert stages["vision_ms"] is stages["prefill_ms"] is stages["preprocess_ms"] is None   # an older genai
    with pytest.raises(EdgevlError, match="printed no result"):
        openvino.parse_result("Traceback (most recent call last):\n")


def test_openvino_ttft_is_split_into_vision_and_prefill_where_genai_times_them():
    """openvino-genai 2026.4's VLMPerfMetrics: tokenization and the embeddings' preparation inside TTFT; the rest
    is the prefill (captured from the real driver on 2b-l4 fp32, f32 hints, prefix cache off)."""
    result = openvino.parse_result((DATA / "openvino-driver-2026.4-split.stdout.txt").read_text())
    assert result["prefix_caching"] is False
    for run in result["runs"]:
        stages = openvino.stage_times(run)
        assert stages["vision_ms"] == run["prepare_embeddings_ms"]
        assert stages["prefill_ms"] == pytest.approx(run["ttft_ms"] - run["prepare_embeddings_ms"] - run["tokenization_ms"])
        assert stages["prefill_ms"] > 150          # a whole prompt's prefill, not a cached one (~50 ms)


def test_openvino_driver_turns_the_pipelines_prefix_cache_off():
    """VLMPipeline's CPU default reuses the previous generate()'s KV cache for a matching prefix: every
    benchmark run after the first would skip its prefill. The driver passes a scheduler config without it."""
    spec = importlib.util.spec_from_file_location("openvino_driver", openvino.DRIVER)
    openvino_driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(openvino_driver)
    genai = types.SimpleNamespace(SchedulerConfig=lambda: types.SimpleNamespace(
        max_num_batched_tokens=256, enable_prefix_caching=True))
    props = openvino_driver.pipeline_properties(genai, {"properties": {"KV_CACHE_PRECISION": "f32"},
                                                        "prefix_caching": False})
    scheduler = props.pop("scheduler_config")
    assert props == {"KV_CACHE_PRECISION": "f32"}
    assert scheduler.enable_prefix_caching is False and scheduler.max_num_batched_tokens == sys.maxsize
    assert "scheduler_config" not in openvino_driver.pipeline_properties(genai, {"prefix_caching": True})


def test_openvino_variants_requests_and_export_command(tmp_path):
    hints = {v["hint"]: v["properties"] for v in openvino.variants("int8")}
    assert hints == {"default": {}, "f32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}}
    assert {v["weight_format"] for v in openvino.variants("w4a16")} == {"int4"}
    f32 = openvino.variants("fp32")[1]
    req = openvino.request(Path("m"), f32, Path("i.png"), "Describe.", 32, runs=5, warmup=1, threads=2)
    assert req["properties"] == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": 2}
    assert (req["new_tokens"], req["runs"], req["warmup"], req["prompt"]) == (32, 5, 1, "Describe.")
    assert req["prefix_caching"] is False and f32["settings"]["prefix_caching"].startswith("off")
    assert "INFERENCE_NUM_THREADS" not in openvino.request(Path("m"), f32, Path("i"), "p", 2, 1, 0)["properties"]
    cmd = list(map(str, openvino.export_command(fake_setup(tmp_path, "openvino"), Path("src"), Path("out"), "int4")))
    assert cmd == ["/peer/optimum_cli", "export", "openvino", "--model", "src", "--task", "image-text-to-text",
                   "--weight-format", "int4", "out"]


def test_weight_compression_is_read_from_the_export(tmp_path):
    config = {"dtype": "int4", "quantization_config": {"quantization_configs": {"lm_model": {
        "bits": 4, "group_size": 128, "sym": False, "ratio": 1.0, "dataset": None}}}}
    (tmp_path / "openvino_config.json").write_text(json.dumps(config))
    assert openvino.weight_compression(tmp_path) == {"bits": 4, "group_size": 128, "sym": False, "ratio": 1.0}
    assert openvino.weight_compression(tmp_path / "fp32") is None


def test_transformers_5_config_gets_the_transformers_4_rope_keys():
    config = {"model_type": "qwen2_vl", "text_config": {"hidden_size": 8, "rope_parameters": {
        "mrope_section": [16, 24, 24], "rope_theta": 1e6, "rope_type": "default"}}}
    legacy = openvino.legacy_config(config)
    for where in (legacy, legacy["text_config"]):
        assert where["rope_scaling"] == {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]}
        assert where["rope_theta"] == 1e6
    assert legacy["text_config"]["hidden_size"] == 8 and "rope_scaling" not in config["text_config"]
    assert openvino.legacy_config(legacy) is None                        # already readable by transformers 4
    assert openvino.legacy_config({"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}) is None


# ----------------------------------------------------------------------------- shared driver code
def test_run_tool_reports_status_output_and_peak_rss():
    run = driver.run_tool([sys.executable, "-c", "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * "
                           "len(b[::4096]); time.sleep(0.2); print('out'); print('first\\nlast words', file=sys.stderr);"
                           " sys.exit(3)"])
    assert (run.returncode, run.stdout) == (3, "out\n") and run.max_rss_bytes > 300 << 20 and run.wall_s > 0
    ballast = bytearray(600 << 20)          # a big parent (edgevl with models loaded) ...
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = driver.run_tool([sys.executable, "-c", "import time; time.sleep(0.2)"])
    assert 0 < small.max_rss_bytes < 200 << 20          # ... is not counted as its child's memory
    del ballast
    with pytest.raises(EdgevlError, match=r"the tool failed \(exit status 3\): last words"):
        driver.check(run, "the tool")
    with pytest.raises(EdgevlError, match="ran past 1 s"):
        driver.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)


def test_build_file_is_atomic_and_built_once(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.write_text("done")
    target = tmp_path / "models" / "m.gguf"
    with pytest.raises(RuntimeError):
        driver.build_file(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError())),
                          lambda m: None)
    assert not target.exists() and not list(target.parent.iterdir())   # nothing half-written left behind
    assert driver.build_file(target, build, lambda m: None).read_text() == "done"
    driver.build_file(target, build, lambda m: None)
    assert len(calls) == 1


def test_source_key_follows_the_model_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    key = driver.source_key(tmp_path)
    assert driver.source_key(tmp_path) == key and key.startswith(f"{tmp_path.parent.name}-{tmp_path.name}-")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert driver.source_key(tmp_path) != key


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


# ----------------------------------------------------------------------------- a peer that crashes
def _fake_mtmd_cli(tmp_path: Path) -> Path:
    """A stand-in llama-mtmd-cli that dies of SIGSEGV unless told --no-repack (what the real one did on an Intel
    Xeon with AMX), else prints the captured log; every call is counted in calls.txt."""
    log = tmp_path / "log.txt"
    log.write_text(MTMD_LOG)
    tool = tmp_path / "mtmd_cli"
    tool.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls.txt
case " $* " in *" --no-repack "*) cat {log} >&2; exit 0;; esac
kill -SEGV $$
""")
    tool.chmod(0o755)
    return tool


def test_llama_cpp_crash_with_repacking_is_run_again_without_it_and_remembered(tmp_path, monkeypatch):
    setup = driver.PeerSetup("llama.cpp", tmp_path, {"paths": {"mtmd_cli": str(_fake_mtmd_cli(tmp_path)),
                                                               "bench": "llama-bench"}})
    monkeypatch.setattr(llama_cpp, "model_files", lambda *a: (tmp_path / "m.gguf", tmp_path / "mm.gguf"))
    variant = llama_cpp.variants("int8")[0]
    logs = []

    def measure():
        return llama_cpp.measure(setup, tmp_path, variant, tmp_path / "i.png", "hi", 4, runs=2, warmup=1, threads=2,
                                 tick=lambda label: None, log=logs.append)
    out = measure()
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    # the first call crashed with repacking on; it and the later runs ran with --no-repack
    assert len(calls) == 4 and "--no-repack" not in calls[0] and all("--no-repack" in c for c in calls[1:])
    assert len(out["runs"]) == 2 and out["command"].endswith("--no-repack")
    assert out["settings"]["repack"].startswith("off (--no-repack): with repacking llama-mtmd-cli was killed by SIGSEGV")
    assert any("SIGSEGV" in line for line in logs)
    measure()                                   # remembered for this CPU: no crashing first try any more
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 4 + 3
    assert llama_cpp.repack_setting(setup)[0] is False
    bench = llama_cpp.bench_command(setup, Path("m.gguf"), [512], repack=False)
    assert bench[-2:] == ["--repack", "0"]


def test_llama_cpp_failure_that_is_not_a_crash_is_not_retried(tmp_path, monkeypatch):
    tool = tmp_path / "mtmd_cli"
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls.txt\necho 'error: bad model file' >&2\nexit 1\n")
    tool.chmod(0o755)
    setup = driver.PeerSetup("llama.cpp", tmp_path, {"paths": {"mtmd_cli": str(tool)}})
    monkeypatch.setattr(llama_cpp, "model_files", lambda *a: (tmp_path / "m.gguf", tmp_path / "mm.gguf"))
    with pytest.raises(EdgevlError, match=r"llama-mtmd-cli failed \(exit status 1\): error: bad model file"):
        llama_cpp.measure(setup, tmp_path, llama_cpp.variants("fp32")[0], tmp_path / "i.png", "hi", 4, runs=1,
                          warmup=0, threads=0, tick=lambda label: None, log=lambda msg: None)
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1
    assert llama_cpp.repack_setting(setup) == (True, llama_cpp.REPACK_ON)


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
