"""bench/peers/openvino.py without OpenVINO installed: its driver's real output (captured in tests/data/peers/)
parsed into stages, its variants, requests and export command, the weight compression read from an export, and the
config keys transformers 4 needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgevl.bench.peers import openvino
from edgevl.errors import EdgevlError
from tests.bench.peers import DATA, fake_setup


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


def test_a_template_only_in_chat_template_json_reaches_the_export(tmp_path):
    """Qwen3-VL keeps its chat template in chat_template.json (a processor file; optimum-intel reads it through
    the processor, which needs torchvision): the export reads a view whose tokenizer_config.json has it inline,
    the source folder is left as it was, and a model whose tokenizer_config.json has one is read as it is."""
    import os
    import stat
    import sys

    from edgevl.bench.peers.driver import PeerSetup
    from edgevl.synthetic.random_model import write_random_model
    qwen3 = write_random_model(tmp_path / "qwen3", preset="qwen3-vl-tiny", seed=0)
    qwen2 = write_random_model(tmp_path / "qwen2", preset="tiny", seed=0)
    template = json.loads((qwen3 / "chat_template.json").read_text())["chat_template"]
    assert openvino.tokenizer_config_with_template(qwen3)["chat_template"] == template
    assert openvino.tokenizer_config_with_template(qwen2) is None      # its tokenizer_config.json has one inline
    tool = tmp_path / "optimum-cli"                                    # copies what it reads into the export
    tool.write_text(f"#!{sys.executable}\nimport shutil, sys\nargs = sys.argv[1:]\n"
                    "shutil.copytree(args[args.index('--model') + 1], args[-1], dirs_exist_ok=True)\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    setup = PeerSetup("openvino", tmp_path / "peer", {"paths": {"optimum_cli": str(tool)}})
    before = {f.name: f.read_bytes() for f in qwen3.iterdir() if f.is_file()}
    out = openvino.model_folder(setup, qwen3, "fp32", log=lambda m: None)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert {f.name: f.read_bytes() for f in qwen3.iterdir() if f.is_file()} == before
    assert not os.path.islink(qwen3 / "tokenizer_config.json")
