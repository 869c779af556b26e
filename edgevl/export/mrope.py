"""M-RoPE as a custom op: `edgevl::MRoPE`, a torch op for export and an ONNX function for every runtime.

Qwen2-VL rotates each attention head with three position ids per token (temporal,
height, width). The head's `head_dim // 2` rotary frequencies are split into three
sections (`mrope_section`, e.g. [16, 24, 24]); section i takes its angles from
position row i. Text tokens have all three rows equal, so it reduces to plain RoPE.

The op, in the `edgevl` ONNX domain:

    y = edgevl::MRoPE(x, position_ids, inv_freq)   attribute mrope_section: ints
      x            [B, num_heads, S, head_dim]   float or float16
      position_ids [3, B, S]                     int64  (temporal, height, width)
      inv_freq     [head_dim // 2]               float32 (the checkpoint's own buffer)
      y            like x

It is saved as a model-local ONNX function, so any ONNX runtime can execute it from
its body, and a backend with a fused M-RoPE kernel may match the node instead.

Export path: the decoder wrapper calls `torch.ops.edgevl.mrope`; the exporter's
custom translation emits a bare `edgevl.MRoPE` node (the exporter never sees the
body, so its optimizer cannot inline it), and `attach_mrope_function` adds the
function definition to the saved model afterwards.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op

from edgevl.artifact import names

DOMAIN, _, OP_NAME = names.MROPE.rpartition(".")

DOMAIN_VERSION = 1

_edgevl = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


# ----------------------------------------------------------------------------- math
def mrope_reference(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                    mrope_section: list[int]) -> torch.Tensor:
    """Eager M-RoPE, written the way transformers' Qwen2-VL computes it.

    x [B, H, S, D]; position_ids [3, B, S]; inv_freq [D/2].
    """
    freqs = position_ids[..., None].float() * inv_freq.float()           # [3, B, S, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    angles = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # [B, S, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]                 # [B, 1, S, D]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@torch.library.custom_op("edgevl::mrope", mutates_args=())
def mrope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
          mrope_section: list[int]) -> torch.Tensor:
    return mrope_reference(x, position_ids, inv_freq, mrope_section)


@mrope.register_fake
def _mrope_fake(x, position_ids, inv_freq, mrope_section):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- ONNX
def mrope_translation(x, position_ids, inv_freq, mrope_section):
    """Custom translation for torch.onnx.export: one opaque `edgevl.MRoPE` node."""
    return _mrope_node(x, position_ids, inv_freq, mrope_section=list(mrope_section))


@onnxscript.script(_edgevl, default_opset=op)
def MRoPE(x, position_ids, inv_freq, mrope_section: list[int]):
    # Angles in float32 whatever x's type: fp16 positions would lose integer precision.
    pos = op.Cast(position_ids, to=onnx.TensorProto.FLOAT)                 # [3, B, S]
    freqs = op.Unsqueeze(pos, [-1]) * inv_freq                             # [3, B, S, D/2]
    sections = op.Constant(value_ints=mrope_section)
    f_t, f_h, f_w = op.Split(freqs, sections, axis=-1)
    angles = op.Concat(op.Gather(f_t, 0, axis=0), op.Gather(f_h, 1, axis=0),
                       op.Gather(f_w, 2, axis=0), axis=-1)                # [B, S, D/2]
    angles = op.Unsqueeze(op.Concat(angles, angles, axis=-1), [1])        # [B, 1, S, D]
    cos = op.CastLike(op.Cos(angles), x)
    sin = op.CastLike(op.Sin(angles), x)
    x1, x2 = op.Split(x, axis=-1, num_outputs=2)
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    return x * cos + rotated * sin


def _mrope_schema() -> onnx.defs.OpSchema:
    """The op's interface (not registered globally; only the exporter's tracer reads it)."""
    P = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc="Multimodal rotary position embedding (Qwen2-VL M-RoPE).",
        inputs=[P("x", "T"), P("position_ids", "tensor(int64)"), P("inv_freq", "tensor(float)")],
        outputs=[P("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "x and y")],
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
