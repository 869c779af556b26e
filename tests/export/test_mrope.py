"""The edgevl.MRoPE function (export/mrope.py) run on its own: its tables equal the reference and the rotation a layer
applies with them equals transformers' multimodal rotary."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgevl.export.mrope import (
    DOMAIN,
    DOMAIN_VERSION,
    OP_NAME,
    mrope_function_proto,
    mrope_tables,
)


def _single_node_model(opset: int = 18) -> onnx.ModelProto:
    """A model holding only edgevl.MRoPE, to run the function body on its own."""
    h = onnx.helper
    node = h.make_node(OP_NAME, ["pos", "inv_freq"], ["cos", "sin"], domain=DOMAIN, mrope_section=[2, 3, 3])
    graph = h.make_graph([node], "mrope", [
        h.make_tensor_value_info("pos", onnx.TensorProto.INT64, [3, "B", "S"]),
        h.make_tensor_value_info("inv_freq", onnx.TensorProto.FLOAT, [8])],
        [h.make_tensor_value_info("cos", onnx.TensorProto.FLOAT, ["B", "S", 8]),
         h.make_tensor_value_info("sin", onnx.TensorProto.FLOAT, ["B", "S", 8])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset), h.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                        functions=[mrope_function_proto(opset)])


def test_mrope_function_body_matches_transformers_rotary(hf_model):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    from edgevl.export.ops import rotary
    model = _single_node_model()
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString())
    emb = hf_model.model.language_model.rotary_emb
    x = torch.randn(2, 4, 7, 16)
    pos = torch.randint(0, 50, (3, 2, 7))          # three different rows: a genuine 3-D case
    cos_hf, sin_hf = emb(x, pos)                   # transformers: [B, S, D], the halves repeated
    cos, sin = sess.run(None, {"pos": pos.numpy(), "inv_freq": emb.inv_freq.numpy()})
    ref_cos, ref_sin = mrope_tables(pos, emb.inv_freq, [2, 3, 3])
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=1e-6)
    # the rotation a layer applies with the tables = transformers' multimodal rotary on q and k
    expected, _ = apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    flat = x.transpose(1, 2).reshape(2, 7, 64)                                    # [B, S, H*D]
    got = rotary(flat, torch.from_numpy(cos), torch.from_numpy(sin), 4).view(2, 7, 4, 16).transpose(1, 2)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
