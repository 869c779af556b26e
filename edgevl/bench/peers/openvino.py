"""OpenVINO GenAI as a peer: VLMPipeline on a folder from `optimum-cli export openvino`.

Set up by `make bench-peers`: a venv with openvino, openvino-genai, openvino-tokenizers,
optimum-intel, nncf and the transformers 4.x that optimum-intel's Qwen2-VL export takes. Per
source model and precision, once (cached under ~/.cache/edgevl/peers/openvino/models/):

    optimum-cli export openvino --model MODEL --task image-text-to-text --weight-format fp32|int8|int4

A config.json written by transformers 5 keeps M-RoPE's sections only in `rope_parameters`;
transformers 4 reads `rope_scaling`, so the export then reads a view of the model folder (links
to its files, config.json with the transformers-4 keys added: `legacy_config`). A model whose chat
template is only in chat_template.json (Qwen3-VL) gets it inline in the view's tokenizer_config.json
(`tokenizer_config_with_template`): optimum-intel takes it from the processor, which needs torchvision.

Each weight format runs twice, with the CPU plugin's default precision (bf16 compute and a u8 KV
cache where the CPU has bf16, as this machine's AVX-512 BF16) and with INFERENCE_PRECISION_HINT
and KV_CACHE_PRECISION f32; the effective values are recorded. openvino_driver.py runs the
pipeline in the peer's Python. VLMPipeline's TTFT is split where openvino-genai's VLMPerfMetrics
has it (2026.x): vision = the embeddings' preparation (image preprocessing, the vision models, the
merge with the text embeddings), prefill = the rest of TTFT after it and the tokenization;
preprocess stays empty (OpenVINO times it inside vision).

VLMPipeline's own default on a CPU keeps a prefix cache across generate() calls: the benchmark's
repeated image and prompt would hit it from the second run on and TTFT would leave the prefill
out. Every run here prefills in full (PREFIX_CACHING: the driver turns the cache off), as a request
with a new image does, and as edgevl's and llama.cpp's runs do.
"""

from __future__ import annotations

import json
import os
import tempfile
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

NAME = "openvino"
REQUIRED = ("python", "optimum_cli")
WEIGHT_FORMATS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "w4a16": "int4"}
HINTS = {"default": {}, "f32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}}
DRIVER = Path(__file__).with_name("openvino_driver.py")
TIMEOUT_S = 3600
PREFIX_CACHING = False      # a run reusing the previous run's KV cache would not measure its prefill


def setup() -> PeerSetup:
    return load_setup(NAME, "openvino", REQUIRED)


def variants(precision: str) -> list[dict]:
    fmt = WEIGHT_FORMATS.get(precision, "fp32")
    return [{"label": f"{fmt}, {hint} precision", "weight_format": fmt, "hint": hint, "properties": props,
             "settings": {"properties": props or "the CPU plugin's defaults",
                          "prefix_caching": "on" if PREFIX_CACHING else "off (every run prefills its whole prompt)"}}
            for hint, props in HINTS.items()]


def legacy_config(config: dict) -> dict | None:
    """config.json with the transformers-4 keys for M-RoPE (`rope_scaling` {type: mrope, mrope_section},
    `rope_theta`) added at the top and in text_config, or None when they are already there."""
    text = dict(config.get("text_config") or config)
    if (text.get("rope_scaling") or config.get("rope_scaling") or {}).get("mrope_section"):
        return None
    rope = text.get("rope_parameters") or config.get("rope_parameters") or {}
    if "mrope_section" not in rope:
        return None
    legacy = {"rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(rope["mrope_section"])},
              "rope_theta": rope.get("rope_theta", text.get("rope_theta"))}
    out = {**config, **legacy}
    if "text_config" in config:
        out["text_config"] = {**config["text_config"], **legacy}
    return out


def tokenizer_config_with_template(model: Path) -> dict | None:
    """tokenizer_config.json with the model's chat template inline, or None when it already has one or the model
    has none. optimum-intel puts the processor's template into the converted tokenizer when it can load the
    processor; Qwen3-VL's processor needs torchvision, which the peer's venv leaves out (setup_peers.sh), and its
    checkpoints keep the template only in chat_template.json, so the export would have none and VLMPipeline
    refuses to run. The same template goes where the tokenizer finds it."""
    try:
        config = json.loads((model / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("chat_template"):
        return None
    template = None
    if (model / "chat_template.jinja").is_file():
        template = (model / "chat_template.jinja").read_text()
    elif (model / "chat_template.json").is_file():
        template = json.loads((model / "chat_template.json").read_text()).get("chat_template")
    return {**config, "chat_template": template} if template else None


def export_command(setup: PeerSetup, model: Path, out: Path, weight_format: str) -> list[str]:
    return [setup.path("optimum_cli"), "export", "openvino", "--model", model, "--task", "image-text-to-text",
            "--weight-format", weight_format, out]


def model_folder(setup: PeerSetup, source: Path, weight_format: str, log: Callable[[str], None]) -> Path:
    """The exported OpenVINO folder for `weight_format` (exported once and cached)."""
    folder = setup.root / "models" / source_key(source)

    def export(tmp: Path):
        model = Path(source)
        replaced = {"config.json": legacy_config(json.loads((model / "config.json").read_text())),
                    "tokenizer_config.json": tokenizer_config_with_template(model)}
        replaced = {name: content for name, content in replaced.items() if content is not None}
        with tempfile.TemporaryDirectory(prefix="edgevl-ov-source-") as view:
            if replaced:
                for f in model.iterdir():
                    if f.name not in replaced:
                        os.symlink(f.resolve(), Path(view) / f.name)
                for name, content in replaced.items():
                    (Path(view) / name).write_text(json.dumps(content, indent=1))
                model = Path(view)
            check(run_tool(export_command(setup, model, tmp, weight_format), TIMEOUT_S),
                  f"optimum-cli export openvino --weight-format {weight_format}")
    return build_file(folder / weight_format, export, log)


def weight_compression(model: Path) -> dict | None:
    """What optimum-intel recorded of its weight compression (bits, group size, symmetry, ratio), if any."""
    try:
        config = json.loads((Path(model) / "openvino_config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    lm = (config.get("quantization_configs") or {}).get("lm_model") or config
    return {k: lm.get(k) for k in ("bits", "group_size", "sym", "ratio")} if lm.get("bits") else None


def request(model: Path, variant: dict, image: Path, prompt: str, new_tokens: int, runs: int, warmup: int,
            threads: int = 0) -> dict:
    props = dict(variant["properties"])
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    return {"model": str(model), "device": "CPU", "properties": props, "image": str(image), "prompt": prompt,
            "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "prefix_caching": PREFIX_CACHING}


def parse_result(stdout: str) -> dict:
    """The driver's last stdout line -> its JSON object."""
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    try:
        result = json.loads(lines[-1])
        result["runs"], result["load_s"]
    except (IndexError, ValueError, KeyError, TypeError):
        raise EdgevlError("the OpenVINO driver printed no result.") from None
    return result


def stage_times(run: dict) -> dict:
    """One driver run -> measure.run_once's shape. vision: VLMPerfMetrics' embeddings preparation (image
    preprocessing, both vision models and the merge: OpenVINO times preprocessing inside it); prefill: the rest
    of TTFT after it and the tokenization; both None where the genai version does not report the split."""
    prepare = run.get("prepare_embeddings_ms")
    prefill = run["ttft_ms"] - prepare - run.get("tokenization_ms", 0.0) if prepare is not None else None
    return {"preprocess_ms": None, "vision_ms": prepare, "prefill_ms": prefill, "ttft_ms": run["ttft_ms"],
            "e2e_ms": run["generate_ms"], "decode_ms": list(run["decode_ms"])}


def measure(setup: PeerSetup, source: Path, variant: dict, image: Path, prompt: str, new_tokens: int,
            runs: int, warmup: int, threads: int, tick, log) -> dict:
    model = model_folder(setup, source, variant["weight_format"], log)
    with tempfile.TemporaryDirectory(prefix="edgevl-ov-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request(model, variant, image, prompt, new_tokens, runs, warmup, threads)))
        run = check(run_tool([setup.path("python"), DRIVER, req], TIMEOUT_S), "the OpenVINO VLMPipeline driver")
    result = parse_result(run.stdout)
    for _ in range(warmup + runs):      # one driver call ran them all
        tick(f"{NAME} {variant['label']}")
    variant["settings"]["effective"] = result.get("effective_properties")
    if result.get("prefix_caching") is not None and result["prefix_caching"] != PREFIX_CACHING:
        raise EdgevlError("the OpenVINO driver did not apply the requested prefix-cache setting.")
    variant["settings"]["weight_compression"] = weight_compression(model)
    return {"runs": [stage_times(r) for r in result["runs"]], "load_times": result["load_s"],
            "peak_rss": result["peak_rss_bytes"], "rss_before": result["rss_before_bytes"], "files": [str(model)],
            "prompt_tokens": result["runs"][-1]["prompt_tokens"] if result["runs"] else None,
            "command": f"VLMPipeline({model.name}, 'CPU', {variant['properties'] or ''})", "per_step_decode": True,
            "threads": threads or None}
