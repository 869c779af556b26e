"""bench/peers/llama_cpp.py without llama.cpp installed: parsing of its real output (captured in tests/data/peers/),
command building, the pre-tokenizer it is told, and a crash with weight repacking run again without it (and
remembered) where a failure that is not a crash is not retried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgevl.bench.peers import driver, llama_cpp
from edgevl.errors import EdgevlError
from tests.bench.peers import DATA, MTMD_LOG, fake_setup


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
