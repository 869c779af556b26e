"""Sparse mixture-of-experts (Qwen3-VL-MoE) as one torch custom op, `edgevl::moe`, with a translation per variant.

    y = edgevl::moe(x, router_logits, fc1, fc2, top_k)
      x              [B, S, H]        the post-attention-norm hidden state
      router_logits  [B * S, E]       x @ router.T (the model's dtype, as transformers computes them)
      fc1            [E, 2 * I, H]    each expert's gate and up projections, rows interleaved (g0, u0, g1, u1, ...)
      fc2            [E, H, I]        each expert's down projection
      y              [B, S, H]        sum over the top_k experts of w * fc2 (silu(g) * u), where the w are the
                                      softmax over all E logits in float32, kept for the top_k, renormalised to 1

which is transformers' `Qwen3VLMoeTextSparseMoeBlock` (router softmax in float32, top-k renormalised, SwiGLU experts,
no shared expert). The interleaved fc1 is what onnxruntime's CPU MoE kernel takes (swiglu_fusion=1; it refuses
the [gate | up] halves the hub stores, which the module reorders once at export).

    "ort"       com.microsoft.MoE (k, swiglu with alpha 1 and beta 0, normalize_routing_weights=1): onnxruntime
                applies the softmax, the top-k and the renormalisation itself and runs only the chosen experts
    "standard"  ONNX-standard ops, dense over the experts: every expert runs on every token and the routing
                weights (zero outside each token's top_k) mix the results. Exact, but E / top_k times the expert
                FLOPs and weight reads of a sparse kernel (16x for 30B-A3B's 128 experts, top 8), and an
                [E, tokens, 2 * I] intermediate: a correctness path, not a fast one
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.onnx_opset import opset18 as op

from edgevl.export.ops import _ATTR, _contrib

_MoE = _contrib("MoE", [("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "T"),
                        ("fc1_experts_bias?", "T"), ("fc2_experts_weights", "T")], [("output", "T")],
                {"k": _ATTR.INT, "activation_type": _ATTR.STRING, "swiglu_fusion": _ATTR.INT,
                 "normalize_routing_weights": _ATTR.INT, "activation_alpha": _ATTR.FLOAT,
                 "activation_beta": _ATTR.FLOAT})


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] as [gate | up] halves (transformers' experts.gate_up_proj) -> rows g0, u0, g1, u1, ..."""
    experts, width, hidden = gate_up.shape
    gate, up = gate_up.split(width // 2, dim=1)
    return torch.stack([gate, up], dim=2).reshape(experts, width, hidden)


def routing_weights(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[..., E] logits -> [..., E] weights: softmax in float32, the top_k kept and renormalised, zeros elsewhere."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    top, index = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))


def moe_reference(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """The op's math, dense over the experts (what the standard translation computes)."""
    shape = x.shape
    tokens = x.reshape(1, -1, shape[-1])                                      # [1, N, H]
    gate_up = tokens @ fc1.transpose(1, 2)                                    # [E, N, 2I]
    hidden = torch.nn.functional.silu(gate_up[..., 0::2]) * gate_up[..., 1::2]
    out = hidden @ fc2.transpose(1, 2)                                        # [E, N, H]
    weights = routing_weights(router_logits, top_k).to(x.dtype)                # [N, E]
    return (out * weights.t()[..., None]).sum(0).reshape(shape)


@torch.library.custom_op("edgevl::moe", mutates_args=())
def moe(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
        top_k: int) -> torch.Tensor:
    return moe_reference(x, router_logits, fc1, fc2, top_k)


@moe.register_fake
def _(x, router_logits, fc1, fc2, top_k):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- ONNX translations
def _moe_ort(x, router_logits, fc1, fc2, top_k):
    return _MoE(x, router_logits, fc1, None, fc2, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)


def _moe_standard(x, router_logits, fc1, fc2, top_k):
    hidden_size = op.Shape(x, start=-1)
    tokens = op.Reshape(x, op.Concat(op.Constant(value_ints=[1, -1]), hidden_size, axis=0))        # [1, N, H]
    gate_up = op.MatMul(tokens, op.Transpose(fc1, perm=[0, 2, 1]))                                # [E, N, 2I]
    gate = op.Slice(gate_up, [0], [2 ** 62], [-1], [2])
    up = op.Slice(gate_up, [1], [2 ** 62], [-1], [2])
    out = op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Transpose(fc2, perm=[0, 2, 1]))  # [E, N, H]
    logits = op.Cast(router_logits, to=onnx.TensorProto.FLOAT)                                     # [N, E]
    probs = op.Softmax(logits, axis=-1)
    top, index = op.TopK(probs, op.Constant(value_ints=[top_k]), axis=-1)
    weights = op.ScatterElements(op.Mul(probs, op.Constant(value_float=0.0)), index,
                                 op.Div(top, op.ReduceSum(top, op.Constant(value_ints=[-1]), keepdims=1)), axis=-1)
    mix = op.Unsqueeze(op.Transpose(op.CastLike(weights, x), perm=[1, 0]), [2])                     # [E, N, 1]
    return op.Reshape(op.ReduceSum(op.Mul(out, mix), op.Constant(value_ints=[0]), keepdims=0), op.Shape(x))


def moe_translations(variant: str) -> dict:
    """torch custom op -> ONNX translation of `edgevl::moe` for one graph variant."""
    return {torch.ops.edgevl.moe.default: _moe_ort if variant == "ort" else _moe_standard}
