"""Qwen3-VL's standard graphs at opset 18 (TensorRT 10.3 / JetPack 6) against transformers.

Below opset 23 the standard variant traces the reference functions into primitive ops (attention, rotary,
RMSNorms with Qwen3's q_norm / k_norm) and the MoE into MatMul / TopK / ScatterElements. The model is
qwen3-vl-moe-tiny cut to two layers, two ViT blocks and two DeepStack levels: the decomposed export is the
slowest one.
"""

from __future__ import annotations

from dataclasses import replace

import onnx
import torch

from edgevl.artifact import load_artifact, names
from edgevl.runtime.backends import trt_parser
from tests.qwen3_reference import Decoder, Prompt, check_decoder, check_vision


def test_standard_graphs_at_opset_18_match_transformers(tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    from edgevl.export.exporter import export_model
    from edgevl.synthetic.architectures import PRESETS
    from edgevl.synthetic.random_model import write_random_model
    preset = replace(PRESETS["qwen3-vl-moe-tiny"], num_hidden_layers=2, vision_depth=2, deepstack_visual_indexes=(0, 1))
    model_dir = write_random_model(tmp_path / "model", preset, seed=5)
    out = export_model(str(model_dir), tmp_path / "o18", variant="standard", opset=18, log=lambda m: None)
    for graph in ("vision", "decoder"):
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        assert next(o.version for o in model.opset_import if o.domain == "") == 18
        assert not {n.op_type for n in model.graph.node} & {"Attention", "RotaryEmbedding", "RMSNormalization", "MoE"}
        for version in ("10.3.0", "10.13.3", "10.16.1"):           # JetPack 6, JetPack 7.0 / 7.1, desktop
            assert trt_parser.check(model, version) == [], (graph, version)
    assert load_artifact(out).manifest.graph(names.DECODER).opset == 18
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = hf.config.text_config
    check_decoder(Decoder(out / "decoder.onnx", 2, text.num_key_value_heads, text.head_dim), hf,
                  Prompt.make(text.hidden_size, 2, seed=6))
    check_vision(out / "vision.onnx", hf, (1, 4, 10), preset.num_position_embeddings, seed=7)
