"""M-RoPE as the project's own op: `edgevl::MRoPE`, a torch custom op for export and an ONNX function for
every runtime.

Qwen2-VL rotates each attention head with three position ids per token (temporal,
height, width). The head's `head_dim // 2` rotary frequencies are split into three
sections (`mrope_section`, e.g. [16, 24, 24]); section i takes its angles from
position row i. Text tokens have all three rows equal, so it reduces to plain RoPE.
Qwen3-VL (`interleaved` = 1) cycles the frequency slots t, h, w, t, h, w, ... instead:
slot j takes row j % 3 while j < 3 * mrope_section[j % 3], row 0 (temporal) after that
([24, 20, 20]: h and w take 20 slots each from the first 60, t the other 24), as
transformers' `Qwen3VLTextRotaryEmbedding` does.

The op turns the position ids into per-token rotary tables ONCE per graph call; every
layer then rotates its queries and keys with them (ops.rotary: RotaryEmbedding):

    cos, sin = edgevl::MRoPE(position_ids, inv_freq)   attributes mrope_section: ints,
                                                        interleaved: int (default 0, Qwen2-VL's layout)
      position_ids [3, B, S]     int64  (temporal, height, width)
      inv_freq     [D/2]         float32 (the checkpoint's own buffer)
      cos, sin     [B, S, D/2]   float32

The `interleaved` attribute is optional with the old behaviour as its default, so the interface
stays domain version 2: a node without it computes what Qwen2-VL's did (artifacts exported before
it existed carry their own copy of the old body anyway). The exporter always writes it on the node:
onnxruntime applies a function attribute's default, onnx 1.23's inliner (the `ort-trt` path) does not.

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
def slot_rows(mrope_section: list[int], interleaved: bool = False) -> list[int]:
    """The position row (0 temporal, 1 height, 2 width) each of the D/2 frequency slots takes its angle from."""
    half = sum(mrope_section)
    if interleaved:
        return [j % 3 if j < 3 * mrope_section[j % 3] else 0 for j in range(half)]
    return [i % 3 for i, size in enumerate(mrope_section) for _ in range(size)]


def mrope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int],
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager M-RoPE tables, the angles transformers' Qwen2-VL (contiguous sections) or Qwen3-VL (interleaved
    slots) computes: cos, sin [B, S, D/2]."""
    freqs = position_ids[..., None].float() * inv_freq.float()           # [3, B, S, D/2]
    rows = torch.tensor(slot_rows(list(mrope_section), interleaved), device=freqs.device)
    angles = freqs.gather(0, rows.expand(1, *freqs.shape[1:]))[0]         # [B, S, D/2]
    return angles.cos(), angles.sin()


@torch.library.custom_op("edgevl::mrope", mutates_args=())
def mrope(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int],
          interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return mrope_tables(position_ids, inv_freq, mrope_section, interleaved)


@mrope.register_fake
def _mrope_fake(position_ids, inv_freq, mrope_section, interleaved=False):
    _, b, s = position_ids.shape
    out = inv_freq.new_empty((b, s, inv_freq.shape[0]))
    return out, out.clone()


# ----------------------------------------------------------------------------- ONNX
def mrope_translation(position_ids, inv_freq, mrope_section, interleaved=False):
    """Custom translation for torch.onnx.export: one opaque `edgevl.MRoPE` node with two outputs."""
    return _mrope_node(position_ids, inv_freq, mrope_section=list(mrope_section), interleaved=int(interleaved))


@onnxscript.script(_edgevl, default_opset=op)
def MRoPE(position_ids, inv_freq, mrope_section: list[int], interleaved: int = 0):
    # Angles in float32 whatever the graph's type: fp16 positions would lose integer precision.
    pos = op.Cast(position_ids, to=onnx.TensorProto.FLOAT)                 # [3, B, S]
    freqs = op.Unsqueeze(pos, [-1]) * inv_freq                             # [3, B, S, D/2]
    # The position row of each frequency slot (slot_rows), from the attributes: constants, folded at load.
    sections = op.Constant(value_ints=mrope_section)                       # [3]
    slot = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(inv_freq)), op.Constant(value_int=1))
    bounds = op.Slice(op.CumSum(sections, op.Constant(value_int=0)), [0], [2])
    contiguous = op.ReduceSum(op.Cast(op.GreaterOrEqual(op.Unsqueeze(slot, [1]), bounds), to=onnx.TensorProto.INT64),
                              [1], keepdims=0)                             # sections side by side
    cycle = op.Mod(slot, op.Constant(value_int=3))
    cycled = op.Where(op.Less(slot, op.Gather(sections, cycle) * op.Constant(value_int=3)), cycle,
                      op.Constant(value_int=0))                            # t, h, w, t, h, w, ..., then t
    flag = op.Cast(op.Constant(value_int=interleaved), to=onnx.TensorProto.BOOL)
    rows = op.Where(flag, cycled, contiguous)                             # [D/2]
    index = op.Expand(op.Reshape(rows, [1, 1, 1, -1]), op.Concat([1], op.Shape(freqs, start=1), axis=0))
    angles = op.Squeeze(op.GatherElements(freqs, index, axis=0), [0])     # [B, S, D/2]: a selection, no arithmetic
    return op.Cos(angles), op.Sin(angles)


def _mrope_schema() -> onnx.defs.OpSchema:
    """The op's interface (not registered globally; only the exporter's tracer reads it)."""
    P = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc="Multimodal rotary position embedding tables (Qwen2-VL / Qwen3-VL M-RoPE): per-token cos and sin.",
        inputs=[P("position_ids", "tensor(int64)"), P("inv_freq", "tensor(float)")],
        outputs=[P("cos", "tensor(float)"), P("sin", "tensor(float)")],
        attributes=[onnx.defs.OpSchema.Attribute("mrope_section", onnx.defs.OpSchema.AttrType.INTS,
                                                 "frequencies per (temporal, height, width) section"),
                    onnx.defs.OpSchema.Attribute("interleaved", onnx.helper.make_attribute("interleaved", 0),
                                                 "1: slots cycle t, h, w (Qwen3-VL); 0: sections side by side")],
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
