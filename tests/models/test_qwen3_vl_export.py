"""Qwen3-VL export (dense), graph level, against transformers' `qwen3_vl`.

The qwen3-vl-tiny checkpoint is written in the hub's layout (legacy rope_scaling, bf16-style key names, the hub's
processor files) and exported in both variants. Checked: the vision graph's merged embeddings and every DeepStack
level (one image, odd grids, a video grid one temporal patch per call), the decoder's logits and KV cache with
visual positions and DeepStack features then a decode step, that DeepStack is used level by level, the
interleaved edgevl.MRoPE body, and the manifest's new fields.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from edgevl.artifact import load_artifact, names
from edgevl.artifact.fields import Fields, ManifestError
from edgevl.artifact.model_config import ModelConfig
from edgevl.export.mrope import DOMAIN, DOMAIN_VERSION, OP_NAME, mrope_function_proto, mrope_tables
from edgevl.runtime.backends import trt_parser
from tests.qwen3_reference import Decoder, Prompt, check_decoder, check_vision

PATCH_ROW = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def model_dir(qwen3_model_dir):
    return qwen3_model_dir


@pytest.fixture(scope="module")
def hf(qwen3_hf):
    return qwen3_hf


@pytest.fixture(scope="module")
def artifact(qwen3_artifact):
    return qwen3_artifact


def _decoder(artifact, hf) -> Decoder:
    text = hf.config.text_config
    return Decoder(artifact / "decoder.onnx", text.num_hidden_layers, text.num_key_value_heads, text.head_dim)


# ----------------------------------------------------------------------------- the artifact
def test_manifest_and_graphs_describe_qwen3_vl(artifact, hf, model_dir):
    manifest = load_artifact(artifact).manifest                   # verifies every hash
    cfg = manifest.config
    assert (cfg.model_type, cfg.head_dim, cfg.num_attention_heads, cfg.hidden_size) == ("qwen3_vl", 32, 4, 64)
    assert cfg.mrope_interleaved and cfg.mrope_section == (6, 5, 5) and cfg.rope_theta == 5e6
    assert (cfg.patch_size, cfg.num_position_embeddings, cfg.vision_deepstack_indexes) == (16, 2304, (0, 1, 2))
    assert cfg.deepstack_levels == 3 and cfg.num_experts is None and cfg.vision_intermediate_size == 96
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert cfg.eos_token_id == tuple(generation["eos_token_id"]) and len(cfg.eos_token_id) == 2   # im_end, endoftext
    vision, decoder = manifest.graph(names.VISION), manifest.graph(names.DECODER)
    assert [(t.name, t.dtype, t.shape) for t in vision.inputs] == [
        (names.PIXEL_VALUES, "float32", (names.NUM_PATCHES, PATCH_ROW)),
        (names.ROTARY_POS_IDS, "int64", (names.NUM_PATCHES, 2)),
        (names.POS_EMBED_IDS, "int64", (names.NUM_PATCHES, 4)),
        (names.POS_EMBED_WEIGHTS, "float32", (names.NUM_PATCHES, 4))]
    assert [t.name for t in vision.outputs] == [names.IMAGE_EMBEDS, names.DEEPSTACK_EMBEDS]
    assert vision.outputs[1].shape[0] == 3 and vision.outputs[1].shape[2] == 64
    lengths = 2 if decoder.kv_cache == names.IN_PLACE else 1
    deepstack = decoder.inputs[2 + lengths]
    assert (deepstack.name, deepstack.shape) == (names.DEEPSTACK_EMBEDS, (3, names.BATCH, names.SEQUENCE, 64))
    assert decoder.inputs[3 + lengths].shape[-1] == 32                     # the KV cache's explicit head_dim


def test_graphs_hold_the_variant_s_ops_and_interleaved_mrope(artifact, hf):
    model = onnx.load(str(artifact / "decoder.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mrope_section": [6, 5, 5], "interleaved": 1}
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    layers = hf.config.text_config.num_hidden_layers
    vision = [(n.domain, n.op_type, tuple(onnx.helper.get_attribute_value(a) for a in n.attribute))
              for n in onnx.load(str(artifact / "vision.onnx")).graph.node]
    gelu = ("com.microsoft", "FastGelu", ()) if artifact.name == "ort" else ("", "Gelu", (b"tanh",))
    assert vision.count(gelu) == hf.config.vision_config.depth          # the ViT MLP's activation, one op each
    assert not [v for v in vision if v[1] == "Tanh"]
    if artifact.name == "ort":
        assert ("com.microsoft", "RotaryEmbedding") in ops
        assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == layers
    else:
        assert {d for d, _ in ops} <= {"", DOMAIN}
        assert {("", "Attention"), ("", "RotaryEmbedding"), ("", "RMSNormalization")} <= ops
        # per layer: input, post-attention, q_norm, k_norm; and the final norm
        assert sum(n.op_type == "RMSNormalization" for n in model.graph.node) == 4 * layers + 1
        for graph in (model, onnx.load(str(artifact / "vision.onnx"))):     # what TensorRT 10.15+ parses
            assert [trt_parser.check(graph, v) for v in ("10.15.1", "11.4.0")] == [[], []]


# ----------------------------------------------------------------------------- vision
@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 10, 14), (1, 2, 30), (1, 18, 6), (3, 6, 4)])
def test_vision_and_every_deepstack_level_match_transformers(grid, artifact, hf):
    """Square, odd (5 x 7 merged units), extreme-aspect and a 3-temporal-patch video grid (one call per patch)."""
    check_vision(artifact / "vision.onnx", hf, grid, hf.config.vision_config.num_position_embeddings, seed=sum(grid))
    assert len(hf.config.vision_config.deepstack_visual_indexes) == 3


# ----------------------------------------------------------------------------- decoder
def test_decoder_logits_and_cache_match_transformers(artifact, hf):
    """A prompt with 4 visual positions and their DeepStack features, then one decode step without any."""
    check_decoder(_decoder(artifact, hf), hf, Prompt.make(hf.config.text_config.hidden_size, 3))


def test_dropping_or_swapping_deepstack_levels_changes_the_logits(artifact, hf):
    """The failure modes seen elsewhere (DeepStack left out, levels reversed) are not silent: each moves the
    logits far past the 1e-4 the graphs match transformers to."""
    decoder, prompt = _decoder(artifact, hf), Prompt.make(hf.config.text_config.hidden_size, 3)
    good = decoder.prefill_and_step(prompt)[0]
    scale = np.abs(good).max()
    for wrong in (np.zeros_like(prompt.dense()), prompt.dense()[::-1].copy(), prompt.dense()[[1, 0, 2]].copy()):
        assert np.abs(decoder.prefill_and_step(prompt, wrong)[0] - good).max() > 0.02 * scale   # measured ~0.15


def test_deepstack_only_at_visual_positions_is_the_dense_sum(artifact, hf):
    """Features at text positions do change the result: the graph adds the dense input everywhere, so zeros at
    text positions are what makes it transformers' visual-positions-only add."""
    decoder, prompt = _decoder(artifact, hf), Prompt.make(hf.config.text_config.hidden_size, 3)
    dense = prompt.dense()
    leaked = dense.copy()
    leaked[:, 0, 0] = 1.0                                                      # a text position
    assert np.abs(decoder.prefill_and_step(prompt, leaked)[0] - decoder.prefill_and_step(prompt, dense)[0]).max() > 1e-3


# ----------------------------------------------------------------------------- edgevl.MRoPE, interleaved
def _mrope_session(section: list[int], interleaved: int, half: int):
    import onnxruntime as ort

    h = onnx.helper
    node = h.make_node(OP_NAME, ["pos", "inv_freq"], ["cos", "sin"], domain=DOMAIN, mrope_section=section,
                       interleaved=interleaved)
    graph = h.make_graph([node], "mrope", [h.make_tensor_value_info("pos", onnx.TensorProto.INT64, [3, "B", "S"]),
                                           h.make_tensor_value_info("inv_freq", onnx.TensorProto.FLOAT, [half])],
                         [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["B", "S", half])
                          for n in ("cos", "sin")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                         functions=[mrope_function_proto(18)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("section", [[24, 20, 20], [6, 5, 5]])
def test_interleaved_mrope_body_matches_transformers(section):
    """The function body with interleaved=1 gives Qwen3VLTextRotaryEmbedding's tables, and rotating q and k with
    them is transformers' apply_rotary_pos_emb; the contiguous layout (interleaved=0) differs."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    from edgevl.export.ops import rotary
    half = sum(section)
    emb = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(
        hidden_size=64, num_attention_heads=4, head_dim=2 * half,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                         "mrope_interleaved": True}))
    pos = torch.randint(0, 300, (3, 2, 7), generator=torch.Generator().manual_seed(0))   # three different rows
    x = torch.randn(2, 4, 7, 2 * half)
    ref_cos, ref_sin = emb(x, pos)                                             # [B, S, D], the halves repeated
    cos, sin = _mrope_session(section, 1, half).run(None, {"pos": pos.numpy(), "inv_freq": emb.inv_freq.numpy()})
    np.testing.assert_allclose(cos, ref_cos[..., :half].numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin[..., :half].numpy(), atol=1e-6)
    eager_cos, _ = mrope_tables(pos, emb.inv_freq, section, interleaved=True)
    np.testing.assert_allclose(cos, eager_cos.numpy(), atol=1e-6)
    expected, _ = apply_rotary_pos_emb(x, x, ref_cos, ref_sin)
    flat = x.transpose(1, 2).reshape(2, 7, 4 * 2 * half)
    got = rotary(flat, torch.from_numpy(cos), torch.from_numpy(sin), 4).view(2, 7, 4, 2 * half).transpose(1, 2)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    contiguous, _ = _mrope_session(section, 0, half).run(None, {"pos": pos.numpy(), "inv_freq": emb.inv_freq.numpy()})
    assert np.abs(contiguous - cos).max() > 0.1


# ----------------------------------------------------------------------------- manifest fields
def _config_json(artifact) -> dict:
    return json.loads((artifact / "manifest.json").read_text())["config"]


@pytest.mark.parametrize("change, message", [
    ({"num_position_embeddings": 2300}, "num_position_embeddings"),
    ({"num_position_embeddings": None}, "num_position_embeddings"),
    ({"vision_deepstack_indexes": [0, 4, 2]}, "vision_deepstack_indexes"),
    ({"vision_deepstack_indexes": [0, 1, 9]}, "vision_deepstack_indexes"),
    ({"mrope_interleaved": False}, "mrope_interleaved"),
    ({"mrope_interleaved": "yes"}, "mrope_interleaved"),
    ({"num_experts": 8}, "num_experts"),
    ({"model_type": "qwen3_vl_moe"}, "num_experts"),
])
def test_manifest_refuses_inconsistent_qwen3_fields(change, message, artifact):
    with pytest.raises(ManifestError, match=message):
        ModelConfig.parse(Fields({**_config_json(artifact), **change}, "config"))


def test_manifests_without_the_new_fields_still_load(artifact):
    """A Qwen2-VL manifest written before these fields existed parses to their defaults (no format bump)."""
    old = {k: v for k, v in _config_json(artifact).items()
           if k not in ("mrope_interleaved", "num_position_embeddings", "vision_deepstack_indexes", "num_experts",
                        "num_experts_per_tok", "moe_intermediate_size")}
    old.update(model_type="qwen2_vl", head_dim=16, num_attention_heads=4, mrope_section=[2, 3, 3])
    config = ModelConfig.parse(Fields(old, "config"))
    assert not config.mrope_interleaved and config.deepstack_levels == 0 and config.num_position_embeddings is None
