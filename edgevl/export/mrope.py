"""M-RoPE as the project's own op: `edgevl::MRoPE`, a torch custom op for export and an ONNX function for
every runtime.

Qwen2-VL rotates each attention head with three position ids per token (temporal,
height, width). The head's `head_dim // 2` rotary frequencies are split into three
sections (`mrope_section`, e.g. [16, 24, 24]); section i takes its angles from
position row i. Text tokens have all three rows equal, so it reduces to plain RoPE.

The op turns the position ids into per-token rotary tables ONCE per graph call; every
layer then rotates its queries and keys with them (ops.rotary: RotaryEmbedding):

    cos, sin = edgevl::MRoPE(position_ids, inv_freq)   attribute mrope_section: ints
      position_ids [3, B, S]     int64  (temporal, height, width)
      inv_freq     [D/2]         float32 (the checkpoint's own buffer)
      cos, sin     [B, S, D/2]   float32

It is saved as a model-local ONNX function, so any ONNX runtime computes it from its
body, and a backend with a fused kernel may match the node instead (docs/graphs.md says
which backend runs what).

Export path: the decoder wrapper calls `torch.ops.edgevl.mrope`; the exporter's custom
translation emits a bare `edgevl.MRoPE` node (the exporter never sees the body, so its
optimizer cannot inline it), and `attach_mrope_function` adds the definition afterwards.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op

from edgevl.artifact import names

DOMAIN, _, OP_NAME = names.MROPE.rpartition(".")
DOMAIN_VERSION = 2     # 1: rotated one tensor per call (artifact format 1); 2: per-token tables

_edgevl = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


# ----------------------------------------------------------------------------- math
def mrope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager M-RoPE tables, the way transformers' Qwen2-VL computes its angles: cos, sin [B, S, D/2]."""
    freqs = position_ids[..., None].float() * inv_freq.float()           # [3, B, S, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    angles = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # [B, S, D/2]
    return angles.cos(), angles.sin()


@torch.library.custom_op("edgevl::mrope", mutates_args=())
def mrope(position_ids: torch.Tensor, inv_freq: torch.Tensor,
          mrope_section: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return mrope_tables(position_ids, inv_freq, mrope_section)


@mrope.register_fake
def _mrope_fake(position_ids, inv_freq, mrope_section):
    _, b, s = position_ids.shape
    out = inv_freq.new_empty((b, s, inv_freq.shape[0]))
    return out, out.clone()


# ----------------------------------------------------------------------------- ONNX
def mrope_translation(position_ids, inv_freq, mrope_section):
    """Custom translation for torch.onnx.export: one opaque `edgevl.MRoPE` node with two outputs."""
    return _mrope_node(position_ids, inv_freq, mrope_section=list(mrope_section))


@onnxscript.script(_edgevl, default_opset=op)
def MRoPE(position_ids, inv_freq, mrope_section: list[int]):
    # Angles in float32 whatever the graph's type: fp16 positions would lose integer precision.
    pos = op.Cast(position_ids, to=onnx.TensorProto.FLOAT)                 # [3, B, S]
    freqs = op.Unsqueeze(pos, [-1]) * inv_freq                             # [3, B, S, D/2]
    sections = op.Constant(value_ints=mrope_section)
    f_t, f_h, f_w = op.Split(freqs, sections, axis=-1)
    angles = op.Concat(op.Gather(f_t, 0, axis=0), op.Gather(f_h, 1, axis=0),
                       op.Gather(f_w, 2, axis=0), axis=-1)                # [B, S, D/2]
    return op.Cos(angles), op.Sin(angles)


def _mrope_schema() -> onnx.defs.OpSchema:
    """The op's interface (not registered globally; only the exporter's tracer reads it)."""
    P = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc="Multimodal rotary position embedding tables (Qwen2-VL M-RoPE): per-token cos and sin.",
        inputs=[P("position_ids", "tensor(int64)"), P("inv_freq", "tensor(float)")],
        outputs=[P("cos", "tensor(float)"), P("sin", "tensor(float)")],
        attributes=[onnx.defs.OpSchema.Attribute("mrope_section", onnx.defs.OpSchema.AttrType.INTS,
                                                 "frequencies per (temporal, height, width) section")],
    )


# An op handle carrying the interface but not the body: the exporter records a
# bare `edgevl.MRoPE` node and has nothing to inline.
_mrope_node = onnxscript.values.Op(_edgevl, OP_NAME, _mrope_schema())


def mrope_function_proto(opset: int) -> onnx.FunctionProto:
    """The op's body as a FunctionProto whose default-domain opset matches the model's.

    The body only uses operators unchanged between opset 18 and the current one,
    so re-stamping the import is safe.
    """
    fn = MRoPE.to_function_proto()
    for imp in fn.opset_import:
        if imp.domain == "":
            imp.version = opset
    return fn


def attach_mrope_function(model: ir.Model) -> ir.Model:
    """Add the MRoPE function definition and domain import to an exported model (in place)."""
    opset = model.opset_imports.get("", 18)
    fn = ir.serde.deserialize_function(mrope_function_proto(opset))
    model.functions.setdefault(fn.identifier(), fn)
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    return model
