"""No hard-coded dimensions: the real Qwen3-VL 2B / 4B / 8B / 30B-A3B geometries at one layer, against transformers.

Each keeps its preset's attention geometry (hidden size, 16 or 32 query heads over 8 or 4 KV heads, head_dim 128
where 4B's 32 x 128 is not its 2560 hidden), the interleaved M-RoPE sections [24, 20, 20], the real ViT width,
heads and MLP (1024 / 4096 on 2B and 4B, 1152 / 4304 on 8B and 30B-A3B: vision head_dim 64 and 72) and its merger
into the LLM width, and the 30B-A3B's routing (128 experts, top 8). Depth, vocabulary and MLP widths are cut
(1 LLM layer, 1 ViT block feeding 1 DeepStack level, experts of width 32; bf16 on disk as on the hub) so the test
runs on a small CPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgevl.synthetic.architectures import PRESETS, QWEN3_TINY_VOCAB_SIZE
from tests.qwen3_reference import Decoder, Prompt, check_decoder, check_vision

GEOMETRIES = {"qwen3-vl-2b": (16, 8, 1024), "qwen3-vl-4b": (32, 8, 1024), "qwen3-vl-8b": (32, 8, 1152),
              "qwen3-vl-30b-a3b": (32, 4, 1152)}          # query heads, KV heads, ViT width


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_real_geometry_at_one_layer_matches_transformers(name, tmp_path):
    import transformers

    from edgevl.export.exporter import export_model
    from edgevl.synthetic.random_model import write_random_model
    real = PRESETS[name]
    assert (real.num_attention_heads, real.num_key_value_heads, real.vision_embed_dim) == GEOMETRIES[name]
    assert real.head_dim == 128 and real.mrope_section == (24, 20, 20) and real.patch_size == 16
    preset = replace(real, num_hidden_layers=1, vision_depth=1, deepstack_visual_indexes=(0,),
                     vocab_size=QWEN3_TINY_VOCAB_SIZE, intermediate_size=256,
                     moe_intermediate_size=32 if real.num_experts else 0)
    model_dir = write_random_model(tmp_path / "model", preset)
    out = export_model(str(model_dir), tmp_path / "out", log=lambda m: None)
    arch = "Qwen3VLMoeForConditionalGeneration" if real.num_experts else "Qwen3VLForConditionalGeneration"
    hf = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    text = hf.config.text_config
    assert (text.hidden_size, text.head_dim, getattr(text, "num_experts", 0)) == (real.hidden_size, 128,
                                                                                  real.num_experts)

    check_vision(out / "vision.onnx", hf, (1, 6, 10), real.num_position_embeddings, seed=0)
    decoder = Decoder(out / "decoder.onnx", 1, text.num_key_value_heads, text.head_dim)
    check_decoder(decoder, hf, Prompt.make(text.hidden_size, 1, seed=1))
