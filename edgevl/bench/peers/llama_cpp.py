"""llama.cpp as a peer: its own tools, built from source, on GGUF files converted from the source model.

Set up by `make bench-peers`: the llama.cpp that the PyPI sdist of llama-cpp-python vendors,
built with cmake (CPU, -DGGML_NATIVE=ON), and a venv for its converter. Per source model and
precision, once (cached under ~/.cache/edgevl/peers/llama.cpp/models/):

    convert_hf_to_gguf.py MODEL --outtype f32            -> model-f32.gguf
    llama-quantize model-f32.gguf model-q8_0.gguf Q8_0    (Q4_0 alike)
    convert_hf_to_gguf.py MODEL --mmproj --outtype f32|f16 -> mmproj-f32.gguf / mmproj-f16.gguf

through gguf_convert.py, which lets the converter accept the presets' stand-in tokenizer (see
there). Each measured run is one `llama-mtmd-cli` process, as its users run it: the model's own
chat template (--jinja), the image, the prompt, greedy (--temp 0), --ignore-eos, -n new tokens,
--perf, log verbosity 4 (which shows its timing lines). What it prints becomes the stages:

    vision   "mtmd batch encoding done in N ms" (the vision encoder + merger)
    prefill  llama_perf's "prompt eval time" minus the vision time: llama.cpp's prompt timer runs
             from the first text chunk's decode to the first sampled token, across the image
             encode (llama-context.cpp: its stats are only taken at a synchronization); it is taken
             as is when it is shorter than vision + "image decoded in" (a build that syncs earlier)
    TTFT     vision + prefill (image file decoding and preprocessing are not timed by the tool)
    decode   "eval time" / runs (a mean per run: the tool reports no per-step times)
    load     the log's clock at "main: loading model" (both GGUF files loaded, contexts created)

Decode against context length comes from `llama-bench -p 0 -n 16 -d C` (synthetic KV cache
of C tokens, like edgevl's probe). llama.cpp's KV cache is f16 by default, in both tools.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from edgevl.bench.peers.driver import (
    PeerSetup,
    build_file,
    check,
    load_setup,
    run_tool,
    source_key,
)
from edgevl.errors import EdgevlError

NAME = "llama.cpp"
REQUIRED = ("python", "source", "mtmd_cli", "quantize", "bench")
# artifact precision -> (LLM GGUF type, mmproj type), paired as users pair them
VARIANTS = {"fp32": ("F32", "F32"), "fp16": ("F16", "F16"), "int8": ("Q8_0", "F32"), "w4a16": ("Q4_0", "F16")}
CONVERTER = Path(__file__).with_name("gguf_convert.py")
TIMEOUT_S = 1800


def setup() -> PeerSetup:
    return load_setup(NAME, "llama.cpp", REQUIRED)


def variants(precision: str) -> list[dict]:
    llm, mmproj = VARIANTS.get(precision, VARIANTS["fp32"])
    return [{"label": f"{llm} (+{mmproj} mmproj)", "llm": llm, "mmproj": mmproj,
             "settings": {"kv_cache": "f16 (llama.cpp's default)", "chat_template": "the model's (--jinja)"}}]


def pre_tokenizer(source: Path) -> str | None:
    """'qwen2' when the model's tokenizer.json pre-tokenizes as Qwen2 does (its split regex, then
    byte-level): then llama.cpp's qwen2 pre-tokenizer is right whatever the vocabulary."""
    from edgevl.synthetic.pieces import QWEN2_PRETOKENIZE_REGEX
    try:
        pre = json.loads((Path(source) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return "qwen2" if regexes == [QWEN2_PRETOKENIZE_REGEX] and steps[-1].get("type") == "ByteLevel" else None


def convert_command(setup: PeerSetup, source: Path, out: Path, outtype: str, mmproj: bool) -> list[str]:
    pre = pre_tokenizer(source)
    return [setup.path("python"), CONVERTER, setup.path("source"), *(["--pre-tokenizer", pre] if pre else []),
            "--", source, *(["--mmproj"] if mmproj else []), "--outtype", outtype.lower(), "--outfile", out]


def model_files(setup: PeerSetup, source: Path, variant: dict, log: Callable[[str], None]) -> tuple[Path, Path]:
    """The GGUF files of `variant` (converted once and cached): (LLM, mmproj)."""
    folder = setup.root / "models" / source_key(source)

    def convert(outtype: str, mmproj: bool):
        return lambda tmp: check(run_tool(convert_command(setup, source, tmp, outtype, mmproj), TIMEOUT_S),
                                 f"llama.cpp's convert_hf_to_gguf.py ({'mmproj ' if mmproj else ''}{outtype})")
    f32 = build_file(folder / "model-f32.gguf", convert("F32", False), log)
    llm = f32 if variant["llm"] == "F32" else build_file(
        folder / f"model-{variant['llm'].lower()}.gguf",
        (lambda tmp: check(run_tool([setup.path("quantize"), f32, tmp, variant["llm"]], TIMEOUT_S),
                           f"llama-quantize {variant['llm']}")) if variant["llm"].startswith("Q")
        else convert(variant["llm"], False), log)
    mmproj = build_file(folder / f"mmproj-{variant['mmproj'].lower()}.gguf", convert(variant["mmproj"], True), log)
    return llm, mmproj


def command(setup: PeerSetup, llm: Path, mmproj: Path, image: Path, prompt: str, new_tokens: int,
            threads: int = 0, repack: bool = True) -> list[str]:
    return [setup.path("mtmd_cli"), "-m", llm, "--mmproj", mmproj, "--image", image, "-p", prompt,
            "-n", str(new_tokens), "--temp", "0", "--ignore-eos", "--jinja", "--perf", "-lv", "4",
            "--log-colors", "off", *(["-t", str(threads)] if threads else []), *([] if repack else ["--no-repack"])]


# ----------------------------------------------------------------------------- weight repacking
# ggml repacks weights at load for the CPU's fastest kernels (its "extra buffer types"; on CPUs with AMX, built with
# GGML_NATIVE, the AMX buffer). On an Intel Xeon with AMX, llama-mtmd-cli and llama-bench crashed with SIGSEGV in
# warm-up on Q8_0 and Q4_0 with it on (issue 24); --no-repack (llama-bench: --repack 0) runs, at a cost. A tool
# killed by a signal with repacking on is run again with it off, and the choice is remembered for this CPU in the
# peer's folder, so later runs and the decode probe start with the configuration that runs.
REPACK_FILE = "repack.json"
REPACK_ON = "on (llama.cpp's default)"


def cpu_signature() -> str:
    """The CPU's model name and feature flags (/proc/cpuinfo's first processor), hashed: what repacking depends on."""
    import hashlib
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform
        text = platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    return hashlib.sha256(f"{fields.get('model name')}|{fields.get('flags')}".encode()).hexdigest()[:16]


def repack_setting(setup: PeerSetup) -> tuple[bool, str]:
    """(repack weights?, the setting as the report names it) for this CPU."""
    try:
        known = json.loads((setup.root / REPACK_FILE).read_text())
    except (OSError, ValueError):
        return True, REPACK_ON
    if isinstance(known, dict) and known.get("cpu") == cpu_signature() and known.get("repack") is False:
        return False, str(known.get("why"))
    return True, REPACK_ON


def remember_no_repack(setup: PeerSetup, why: str) -> None:
    path = setup.root / REPACK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"cpu": cpu_signature(), "repack": False, "why": why}) + "\n")
    tmp.replace(path)


def killed_by(run) -> str | None:
    """The signal's name when the tool was killed by one (SIGSEGV...), else None."""
    if run.returncode >= 0:
        return None
    import signal
    try:
        return signal.Signals(-run.returncode).name
    except ValueError:
        return f"signal {-run.returncode}"


def run_with_repack_fallback(setup: PeerSetup, make_cmd: Callable[[bool], list], what: str, log) -> tuple:
    """Run make_cmd(repack) with this CPU's repack setting; when the tool is killed by a signal with repacking
    on, once more with it off (and remember that). -> (the successful ToolRun, its command, the repack setting)."""
    repack, setting = repack_setting(setup)
    cmd = make_cmd(repack)
    run = run_tool(cmd, TIMEOUT_S)
    signal_name = killed_by(run) if repack else None
    if signal_name:
        setting = f"off (--no-repack): with repacking {what} was killed by {signal_name} on this CPU"
        log(f"llama.cpp: {what} was killed by {signal_name} with weight repacking on; running it with --no-repack")
        remember_no_repack(setup, setting)
        cmd = make_cmd(False)
        run = run_tool(cmd, TIMEOUT_S)
    return check(run, what), cmd, setting


_STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+)"
PATTERNS = {
    "vision_ms": re.compile(r"(?:mtmd batch encoding done|image slice encoded) in (\d+(?:\.\d+)?) ms"),
    "image_decode_ms": re.compile(r"image decoded \(batch \d+/\d+\) in (\d+(?:\.\d+)?) ms"),
    "prompt_eval": re.compile(r"llama_perf_context_print:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
    "eval": re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs"),
    "loaded": re.compile(_STAMP + r" \w main: loading model"),
}


def parse_output(text: str) -> dict:
    """llama-mtmd-cli's log (stderr) -> the raw numbers it reports (ms; see the module docstring)."""
    def total(key):
        found = PATTERNS[key].findall(text)
        return sum(float(v) for v in found) if found else None
    prompt, decode, loaded = (PATTERNS[k].search(text) for k in ("prompt_eval", "eval", "loaded"))
    if prompt is None or decode is None:
        raise EdgevlError("llama-mtmd-cli printed no llama_perf timings (run it with --perf -lv 4 to see its log).")
    stamp = [int(v) for v in loaded.groups()] if loaded else None
    return {"vision_ms": total("vision_ms"), "image_decode_ms": total("image_decode_ms"),
            "prompt_eval_ms": float(prompt.group(1)), "prompt_tokens": int(prompt.group(2)),
            "eval_ms": float(decode.group(1)), "eval_runs": int(decode.group(2)),
            "load_s": (stamp[0] * 60 + stamp[1] + stamp[2] / 1e3 + stamp[3] / 1e6) if stamp else None}


def stage_times(parsed: dict) -> dict:
    """Raw numbers -> one run's stages in measure.run_once's shape (decode: the run's mean per step)."""
    vision = parsed["vision_ms"] or 0.0
    prompt = parsed["prompt_eval_ms"]
    spans_encode = prompt >= vision + (parsed["image_decode_ms"] or 0.0)
    prefill = prompt - vision if spans_encode else prompt
    steps = parsed["eval_runs"]
    decode = [parsed["eval_ms"] / steps] * steps if steps else []
    ttft = vision + prefill
    return {"preprocess_ms": None, "vision_ms": parsed["vision_ms"], "prefill_ms": prefill, "ttft_ms": ttft,
            "e2e_ms": ttft + parsed["eval_ms"], "decode_ms": decode}


def bench_command(setup: PeerSetup, llm: Path, contexts: list[int], threads: int = 0, tokens: int = 16,
                  repack: bool = True) -> list[str]:
    return [setup.path("bench"), "-m", llm, "-p", "0", "-n", str(tokens), "-d", ",".join(map(str, contexts)),
            "-r", "3", "-o", "json", *(["-t", str(threads)] if threads else []), *([] if repack else ["--repack", "0"])]


def parse_bench(stdout: str) -> list[tuple[int, float]]:
    """llama-bench -o json -> (context, ms per token) for each timed repetition."""
    try:
        tests = json.loads(stdout)
    except ValueError:
        raise EdgevlError("llama-bench printed no JSON.") from None
    return [(int(t["n_depth"]), ns / t["n_gen"] / 1e6) for t in tests if t.get("n_gen") for ns in t["samples_ns"]]


def measure(setup: PeerSetup, source: Path, variant: dict, image: Path, prompt: str, new_tokens: int,
            runs: int, warmup: int, threads: int, tick, log) -> dict:
    """warm-up + measured llama-mtmd-cli runs -> {"runs": [stage dicts], "load_times", "peak_rss", ...}."""
    llm, mmproj = model_files(setup, source, variant, log)
    out = {"runs": [], "load_times": [], "peak_rss": 0, "files": [str(llm), str(mmproj)],
           "per_step_decode": False, "threads": threads or None}

    def make_cmd(repack: bool) -> list:
        return command(setup, llm, mmproj, image, prompt, new_tokens, threads, repack)
    for i in range(warmup + runs):
        tick(f"{NAME} {variant['llm']} {'warm-up' if i < warmup else 'run'}")
        run, cmd, repack = run_with_repack_fallback(setup, make_cmd, "llama-mtmd-cli", log)
        out["command"], out["settings"] = " ".join(map(str, cmd)), {"repack": repack, "threads": threads or "default"}
        parsed = parse_output(run.stderr)
        if i >= warmup:
            out["runs"].append(stage_times(parsed))
            out["load_times"].append(parsed["load_s"])
            out["peak_rss"] = max(out["peak_rss"], run.max_rss_bytes)
            out["prompt_tokens"] = parsed["prompt_tokens"]
    return out


def probe(setup: PeerSetup, source: Path, variant: dict, contexts: list[int], threads: int, log) -> list:
    llm, _ = model_files(setup, source, variant, log)
    run, _, _ = run_with_repack_fallback(setup, lambda repack: bench_command(setup, llm, contexts, threads,
                                                                            repack=repack), "llama-bench", log)
    return parse_bench(run.stdout)
