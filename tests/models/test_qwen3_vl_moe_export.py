"""Qwen3-VL-MoE export against transformers' `qwen3_vl_moe`.

qwen3-vl-moe-tiny: 8 experts, top 2, every layer sparse, experts stored on disk in the hub's layout. The `ort`
decoder runs them with onnxruntime's com.microsoft.MoE, the `standard` one with ONNX-standard ops (dense over
the experts); both must give transformers' logits and KV cache.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgevl.artifact import load_artifact
from edgevl.runtime.backends import trt_parser
from tests.qwen3_reference import Decoder, Prompt, check_decoder, check_vision


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("qwen3moe") / "model", preset="qwen3-vl-moe-tiny", seed=2)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Qwen3VLMoeForConditionalGeneration
    return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["ort", "standard"])
def artifact(request, model_dir, tmp_path_factory):
    from edgevl.export.exporter import export_model
    return export_model(str(model_dir), tmp_path_factory.mktemp("qwen3moe-export") / request.param,
                        variant=request.param, log=lambda m: None)


def _decoder(folder, hf) -> Decoder:
    text = hf.config.text_config
    return Decoder(folder / "decoder.onnx", text.num_hidden_layers, text.num_key_value_heads, text.head_dim)


def test_the_checkpoint_stores_experts_as_the_hub_does(model_dir, hf):
    """experts.gate_up_proj [E, H, 2I] and down_proj [E, I, H] on disk; transformers loads them transposed."""
    from safetensors import safe_open
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        gate_up = f.get_tensor("model.language_model.layers.0.mlp.experts.gate_up_proj")
        down = f.get_tensor("model.language_model.layers.0.mlp.experts.down_proj")
    assert tuple(gate_up.shape) == (8, 64, 96) and tuple(down.shape) == (8, 48, 64)
    experts = hf.model.language_model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj, gate_up.transpose(1, 2)) and torch.equal(experts.down_proj,
                                                                                      down.transpose(1, 2))


def test_manifest_records_the_experts(artifact):
    cfg = load_artifact(artifact).manifest.config
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
        ("qwen3_vl_moe", 8, 2, 48)


def test_sparse_layers_are_moe_nodes_or_standard_ops(artifact, hf):
    model = onnx.load(str(artifact / "decoder.onnx"))
    moe = [n for n in model.graph.node if n.op_type == "MoE"]
    if artifact.name == "ort":
        assert len(moe) == hf.config.text_config.num_hidden_layers and moe[0].domain == "com.microsoft"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
        assert attrs == {"k": 2, "activation_type": b"swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1,
                         "activation_alpha": 1.0, "activation_beta": 0.0}
    else:
        assert not moe and {n.domain for n in model.graph.node} <= {"", "edgevl"}
        assert any(n.op_type == "TopK" for n in model.graph.node)
        assert trt_parser.check(model, "10.15.1") == []                # what TensorRT parses


def test_decoder_logits_and_cache_match_transformers(artifact, hf):
    check_decoder(_decoder(artifact, hf), hf, Prompt.make(hf.config.text_config.hidden_size, 3, seed=3))


def test_vision_matches_transformers(artifact, hf):
    check_vision(artifact / "vision.onnx", hf, (1, 6, 10), 2304, seed=4)


def test_moe_op_matches_the_transformers_block():
    """edgevl::moe's reference (what both translations compute) on transformers' own sparse block, many tokens."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    from edgevl.export.qwen3_vl import SparseMoE
    torch.manual_seed(0)
    block = Qwen3VLMoeTextSparseMoeBlock(Qwen3VLMoeTextConfig(hidden_size=40, num_experts=16, num_experts_per_tok=4,
                                                              moe_intermediate_size=12)).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 17, 40)
    with torch.no_grad():
        torch.testing.assert_close(SparseMoE(block)(x), block(x), atol=1e-5, rtol=1e-5)


def test_the_runtime_gives_transformers_greedy_tokens(artifact, hf, model_dir):
    """The MoE artifact through the torch-free Pipeline (image, DeepStack, sparse layers): tokens equal transformers'."""
    import json

    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from edgevl.bench.reference import processor_inputs
    from edgevl.runtime.pipeline import Pipeline
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    image = Image.fromarray((np.random.default_rng(3).random((200, 260, 3)) * 255).astype(np.uint8))
    inputs = processor_inputs(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(model_dir), "What is it?", [image])
    ids = inputs["input_ids"]
    ours = Pipeline.load(artifact).generate("What is it?", images=[image], max_new_tokens=8, do_sample=False,
                                            repetition_penalty=1.0)
    assert ours.prompt_token_ids == ids[0].tolist()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=(ids == hf.config.image_token_id).int(), pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], max_new_tokens=8, do_sample=False,
                          repetition_penalty=1.0)[0, ids.shape[1]:].tolist()
    assert ours.token_ids == ref[:len(ours.token_ids)]


@pytest.mark.parametrize("recipe, bits", [("int8", 8), ("w4a16", 4)])
def test_quantized_recipes_quantize_the_experts(recipe, bits, artifact, tmp_path):
    """int8 / w4a16 turn every MoE node into QMoE whose experts are this artifact's experts rounded to `bits`
    (each weight within half a step of its block's scale), the report says so, and the artifact runs an image."""
    from onnx import numpy_helper

    from edgevl.calibrate import moe
    from edgevl.calibrate.options import QuantizeOptions
    from edgevl.calibrate.quantize import quantize
    from edgevl.runtime.pipeline import Pipeline
    if load_artifact(artifact).manifest.graph("decoder").variant != "ort":
        pytest.skip("standard graphs have no MoE node: their experts are MatMuls over stacked weights")
    options = QuantizeOptions(recipe, samples=2, eval_samples=1, new_tokens=2, calib_steps=2, progress=False,
                              force=True, block_size=32)
    report = quantize(artifact, tmp_path / recipe, options, None, log=lambda m: None, table=lambda t: None)
    # experts 48 wide: the largest power-of-two block dividing 64 and 48 is 16, not the recipe's 32
    assert report["graphs"]["decoder"]["details"]["experts"] == {"layers": 4, "bits": bits, "block_size": 16}
    source = onnx.load(str(artifact / "decoder.onnx"))
    floats = {n.name: [numpy_helper.to_array(t) for i in (2, 4) for t in source.graph.initializer
                       if t.name == n.input[i]] for n in moe.moe_nodes(source)}
    decoder = onnx.load(str(tmp_path / recipe / "decoder.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in decoder.graph.initializer}
    qmoe = [n for n in decoder.graph.node if n.op_type == "QMoE"]
    assert not moe.moe_nodes(decoder) and sorted(n.name for n in qmoe) == sorted(floats)
    for node in qmoe:
        for weight, (q, s, z) in zip(floats[node.name], ((2, 3, 11), (5, 6, 12))):
            scales = inits[node.input[s]]
            got = moe.dequantize_experts(inits[node.input[q]], scales, inits[node.input[z]], bits)
            assert np.all(np.abs(got - weight) <= np.repeat(scales, 16, axis=-1) / 2 + 1e-6)
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    result = Pipeline.load(tmp_path / recipe).generate("What is it?", images=[image], max_new_tokens=3,
                                                       do_sample=False)
    assert 1 <= len(result.token_ids) <= 3
