"""The embedding table: quantized with the rest, gathered and dequantized per token, and stored once when the
embeddings are tied (the table is the decoder's lm_head)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgevl.artifact import load_artifact
from edgevl.calibrate.embedding import quantize_rows
from edgevl.runtime.embeddings import dequantize_rows
from tests.hf_reference import hf_generate, strip_after_eos


@pytest.mark.parametrize("bits,block,hidden", [(4, 32, 64), (4, 32, 80), (8, 128, 64), (4, 128, 1536)])
def test_rows_in_matmulnbits_layout_are_what_its_kernel_multiplies_by(bits, block, hidden):
    """quantize_rows writes onnxruntime MatMulNBits' own layout: a MatMulNBits node over those arrays computes
    x @ dequantize_rows(...).T; and the rows are the round-to-nearest of the table."""
    rng = np.random.default_rng(bits + hidden)
    vocab = 96
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    weight, scales, zero = quantize_rows(table, bits, block)
    rows = dequantize_rows(weight, scales, zero, bits, hidden)
    h = onnx.helper
    node = h.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=hidden, N=vocab,
                       bits=bits, block_size=block, accuracy_level=0)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, hidden])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, vocab])],
                         [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(scales.reshape(-1), "s"),
                          onnx.numpy_helper.from_array(zero.reshape(-1), "z")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ rows.T, rtol=1e-4, atol=1e-3)
    step = np.abs(table).max() / (15 if bits == 4 else 255) * 2
    assert np.abs(rows - table).max() <= step                         # within one quantization step


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny model with tied embeddings, exported with its weights in external data (as every real one is)."""
    from edgevl.artifact import onnx_files
    from edgevl.export.exporter import export_model
    from edgevl.synthetic.architectures import get_preset
    from edgevl.synthetic.random_model import write_random_model
    root = tmp_path_factory.mktemp("tied")
    model = write_random_model(root / "model", replace(get_preset("tiny"), tie_word_embeddings=True), seed=1)
    threshold = onnx_files.EXTERNAL_DATA_MIN_BYTES
    onnx_files.EXTERNAL_DATA_MIN_BYTES = 0
    try:
        out = export_model(str(model), root / "fp32", log=lambda m: None)
    finally:
        onnx_files.EXTERNAL_DATA_MIN_BYTES = threshold
    return model, out


def test_a_tied_table_is_the_decoders_lm_head_and_generation_matches_transformers(tied, photos):
    from transformers import Qwen2VLForConditionalGeneration

    from edgevl.runtime.pipeline import Pipeline
    from tests.hf_reference import make_hf_inputs
    model_dir, out = tied
    art = load_artifact(out)
    emb = art.manifest.embeddings
    assert emb.tied and emb.encoding == "dense" and emb.files == ("decoder.onnx.data",)
    assert not (out / "embed_tokens.npy").exists()                     # stored once
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pipe = Pipeline.load(out)
    table = hf.model.language_model.embed_tokens.weight.detach().numpy()
    ids = np.arange(0, table.shape[0], 7)
    assert np.array_equal(pipe.embeddings.rows(ids), table[ids])
    prompt, paths = "Describe this image.", [photos["coffee"]]
    hf_ids, extra = make_hf_inputs(model_dir)(prompt, paths)
    ours = pipe.generate(prompt, images=paths, max_new_tokens=12, do_sample=False)
    assert ours.token_ids == strip_after_eos(hf_generate(hf, hf_ids, extra, max_new_tokens=12)[0].tolist(),
                                              pipe.config.eos_token_id)


@pytest.mark.parametrize("recipe,bits", [("w4a16", 4), ("int8", 8)])
def test_a_quantized_tied_table_shares_the_quantized_lm_head(tied, tmp_path, photos, recipe, bits):
    from edgevl.artifact import onnx_files
    from edgevl.runtime.pipeline import Pipeline
    from tests.calibrate.test_quantize import quantize
    _, src = tied
    threshold = onnx_files.EXTERNAL_DATA_MIN_BYTES
    onnx_files.EXTERNAL_DATA_MIN_BYTES = 0
    try:
        rep = quantize(src, tmp_path / recipe, recipe, block_size=32, force=True)
    finally:
        onnx_files.EXTERNAL_DATA_MIN_BYTES = threshold
    art = load_artifact(tmp_path / recipe)
    emb = art.manifest.embeddings
    if rep["graphs"]["decoder"]["details"].get("activations") or "int4" in rep["graphs"]["decoder"]["precision"]:
        lm_head_kept_fp32 = any(k["group"] == "lm_head" and k["precision"] == "fp32"
                                for k in rep["graphs"]["decoder"]["kept_higher_precision"])
        if not lm_head_kept_fp32:
            assert emb.tied and emb.encoding == "blocks" and emb.files == ("decoder.onnx.data",)
            assert not (art.path / "embed_tokens.npy").exists() and not (art.path / "embed_tokens.bin").exists()
            assert emb.bits in (bits, 8)                                 # the lm_head may be raised to 8 bits
    e = rep["embeddings"]
    assert e["rows"] > 100 and e["cosine_mean"] > 0.97 and e["bytes"] < e["fp32_bytes"] / (3 if bits == 4 else 1.8)
    result = Pipeline.load(art.path).generate("What is this?", images=[photos["coffee"]], max_new_tokens=4,
                                              do_sample=False)
    assert 1 <= len(result.token_ids) <= 4
