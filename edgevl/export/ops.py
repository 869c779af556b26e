"""The fused ops the exported graphs are made of: torch custom ops for export, one ONNX translation per variant.

    op (torch)                           "ort" variant (onnxruntime)        "standard", opset >= 23 (TensorRT >= 10.15)
    rotary(x, cos, sin, heads)           com.microsoft.RotaryEmbedding       RotaryEmbedding-23
    attention(q, k, v, ...)              com.microsoft.MultiHeadAttention    Attention-23 (4-D, one output)
    window_attention(q, k, v, mask, ..)  MultiHeadAttention + key mask       Attention-23 + bool mask (Qwen2.5-VL)
    attention_in_place(q, k, v, cache)   com.microsoft.GroupQueryAttention   -
    attention_concat(q, k, v, mask, ..)  -                                   Concat + Attention-23 (4-D, one output)
    rms_norm(x, weight, eps)             x / sqrt(mean(x^2) + eps) * weight  RMSNormalization-23
                                         (fused by onnxruntime at load)
    gelu_tanh(x)                         com.microsoft.FastGelu              Gelu-20, approximate "tanh"
                                         (Qwen3-VL's ViT MLP; its seven traced nodes are not fused at load)

Each op is a reference function (what the ONNX op computes, written out) wrapped by a torch custom op
with a fake for tracing; `translations(variant)` is the table handed to torch.onnx.export. Standard graphs
below opset 23 trace the reference functions themselves into primitive ops (`DECOMPOSED`), which older
TensorRT parses. The modules in modules.py call only an `Ops`, so which ONNX ops a graph holds is decided
here, in one place.

Layouts: activations are [batch, sequence, heads * head_dim] ("BSH", what every one of these ONNX ops
takes); rotary tables are per token, [batch, sequence, head_dim / 2], computed once per graph call
(edgevl.MRoPE in the decoder). Rotation is the non-interleaved one (rotate_half), as in Qwen2-VL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import torch
from onnxscript import values
from onnxscript.onnx_opset import opset18 as op
from onnxscript.onnx_opset import opset23 as op23

MS_DOMAIN = "com.microsoft"
_ms = values.Opset(MS_DOMAIN, 1)
_P = onnx.defs.OpSchema.FormalParameter
_ATTR = onnx.defs.OpSchema.AttrType
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _contrib(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
             attrs: dict[str, onnx.defs.OpSchema.AttrType]) -> values.Op:
    """An op handle for an onnxruntime contrib op (its interface only: the exporter records the node).
    An input named "x?" is optional."""
    optional, single = onnx.defs.OpSchema.FormalParameterOption.Optional, onnx.defs.OpSchema.FormalParameterOption.Single
    schema = onnx.defs.OpSchema(
        name, MS_DOMAIN, 1, inputs=[_P(n.rstrip("?"), t, param_option=optional if n.endswith("?") else single)
                                    for n, t in inputs], outputs=[_P(n, t) for n, t in outputs],
        type_constraints=[("T", FLOATS, "float activations")],
        attributes=[onnx.defs.OpSchema.Attribute(a, kind, a) for a, kind in attrs.items()])
    return values.Op(_ms, name, schema)


def _standard(name: str, version: int, outputs: int) -> values.Op:
    """An ONNX-standard op whose node gets only its first `outputs` outputs (the rest are optional): the
    exporter otherwise creates every output the schema lists, e.g. Attention's qk_matmul_output."""
    real = onnx.defs.get_schema(name, version)
    schema = onnx.defs.OpSchema(
        name, "", version,
        inputs=[_P(p.name, p.type_str, param_option=p.option) for p in real.inputs],
        outputs=[_P(p.name, p.type_str, param_option=p.option) for p in real.outputs[:outputs]],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in real.type_constraints],
        attributes=list(real.attributes.values()))
    return values.Op(values.Opset("", version), name, schema)


_Attention1 = _standard("Attention", 23, outputs=1)

_RotaryEmbedding = _contrib("RotaryEmbedding", [("input", "T"), ("position_ids", "tensor(int64)"),
                                                ("cos_cache", "T"), ("sin_cache", "T")], [("output", "T")],
                            {"num_heads": _ATTR.INT, "interleaved": _ATTR.INT})
_MultiHeadAttention = _contrib("MultiHeadAttention", [("query", "T"), ("key", "T"), ("value", "T")],
                               [("output", "T")], {"num_heads": _ATTR.INT, "scale": _ATTR.FLOAT})
_MaskedMultiHeadAttention = _contrib(
    "MultiHeadAttention", [("query", "T"), ("key", "T"), ("value", "T"), ("bias?", "T"),
                           ("key_padding_mask", "tensor(int32)")],
    [("output", "T")], {"num_heads": _ATTR.INT, "scale": _ATTR.FLOAT})
_FastGelu = _contrib("FastGelu", [("X", "T")], [("Y", "T")], {})
_GroupQueryAttention = _contrib(
    "GroupQueryAttention",
    [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
     ("seqlens_k", "tensor(int32)"), ("total_sequence_length", "tensor(int32)")],
    [("output", "T"), ("present_key", "T"), ("present_value", "T")],
    {"num_heads": _ATTR.INT, "kv_num_heads": _ATTR.INT, "scale": _ATTR.FLOAT})


# ----------------------------------------------------------------------------- eager references
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _attend(q, k, v, scale: float, bias=None) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hkv, T, D] (Hkv divides Hq), bias [B, 1, S, T] additive or None."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x [B, S, H*D] rotated by per-token tables cos/sin [B, S, D/2] (rotate_half: pairs i, i + D/2)."""
    xh = _heads(x, num_heads)                                      # [B, H, S, D]
    half = xh.shape[-1] // 2
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)     # [B, 1, S, D/2]
    x1, x2 = xh[..., :half], xh[..., half:]
    return _merge(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, kv_heads: int,
                        scale: float) -> torch.Tensor:
    """Full (non-causal) attention, no mask: q [B, S, Hq*D], k/v [B, T, Hkv*D] -> [B, S, Hq*D]."""
    return _merge(_attend(_heads(q, num_heads), _heads(k, kv_heads), _heads(v, kv_heads), scale))


def attention_concat_reference(q, k, v, bias, past_key, past_value, num_heads: int, kv_heads: int, scale: float):
    """Attention whose cache grows by concatenation: present = past ++ new [B, Hkv, P+S, D]; bias [B, 1, S, P+S]
    additive (causality and padding)."""
    present_k = torch.cat([past_key, _heads(k, kv_heads)], 2)
    present_v = torch.cat([past_value, _heads(v, kv_heads)], 2)
    return _merge(_attend(_heads(q, num_heads), present_k, present_v, scale, bias)), present_k, present_v


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: normalised in float32, cast back, then scaled."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def window_attention_reference(q, k, v, mask, num_heads: int, scale: float):
    """Attention within each window: q/k/v [windows, slots, H*D], mask [windows, slots] (1 = a real key)."""
    bias = torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]          # [windows, 1, 1, slots]
    return _merge(_attend(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), scale, bias))


@torch.library.custom_op("edgevl::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, num_heads: int,
                     scale: float) -> torch.Tensor:
    return window_attention_reference(q, k, v, mask, num_heads, scale)


@window_attention.register_fake
def _(q, k, v, mask, num_heads, scale):
    return torch.empty_like(q)


@torch.library.custom_op("edgevl::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    return rotary_reference(x, cos, sin, num_heads)


@rotary.register_fake
def _(x, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("edgevl::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, kv_heads: int,
              scale: float) -> torch.Tensor:
    return attention_reference(q, k, v, num_heads, kv_heads, scale)


@attention.register_fake
def _(q, k, v, num_heads, kv_heads, scale):
    return torch.empty_like(q)


@torch.library.custom_op("edgevl::attention_in_place", mutates_args=())
def attention_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                       past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                       num_heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention over a cache buffer written by position (GroupQueryAttention's contract).

    past_key/value [B, Hkv, M, D] hold each row's first `past` positions; row b ends at seqlens_k[b] + 1
    tokens after this call. A row with seqlens_k[b] + 1 < S is a right-padded first prompt (past 0);
    otherwise its past is seqlens_k[b] + 1 - S. The new keys/values go to positions [past, past + new);
    present_* is the buffer after the write (in the runtime: the same memory as past_*).
    """
    qh, kh, vh = _heads(q, num_heads), _heads(k, kv_heads), _heads(v, kv_heads)
    seq = q.shape[1]
    present_k, present_v, out = past_key.clone(), past_value.clone(), torch.zeros_like(qh)
    for b, last in enumerate(seqlens_k.tolist()):
        total = last + 1
        past = max(total - seq, 0)
        new = total - past
        present_k[b, :, past:total], present_v[b, :, past:total] = kh[b, :, :new], vh[b, :, :new]
        causal = torch.full((new, total), float("-inf")).triu(past + 1)
        out[b, :, :new] = _attend(qh[b:b + 1, :, :new], present_k[b:b + 1, :, :total],
                                  present_v[b:b + 1, :, :total], scale, causal[None, None])[0]
    return _merge(out), present_k, present_v


@attention_in_place.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_heads, scale):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("edgevl::attention_concat", mutates_args=())
def attention_concat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, num_heads: int, kv_heads: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_concat_reference(q, k, v, bias, past_key, past_value, num_heads, kv_heads, scale)


@attention_concat.register_fake
def _(q, k, v, bias, past_key, past_value, num_heads, kv_heads, scale):
    b, kvh, p, d = past_key.shape
    present = past_key.new_empty((b, kvh, p + k.shape[1], d))
    return torch.empty_like(q), present, present.clone()


@torch.library.custom_op("edgevl::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("edgevl::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_reference(x)


@gelu_tanh.register_fake
def _(x):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- ONNX translations
def _rotary_ort(x, cos, sin, num_heads):
    # Per-token tables as the op's "cache": row b*S + s belongs to token (b, s). The token index comes from the
    # tables' shape, not x's: every rotary node of a graph then computes it from the same tensor and the
    # optimizers merge those subgraphs into one (from x's shape, q and k of every layer each built their own).
    shape = op.Shape(cos)
    tokens = op.Mul(op.Slice(shape, [0], [1]), op.Slice(shape, [1], [2]))
    position_ids = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(tokens, [0]), op.Constant(value_int=1)),
                              op.Slice(shape, [0], [2]))
    half = op.Shape(cos, start=2)
    flat = op.Concat(op.Constant(value_ints=[-1]), half, axis=0)
    return _RotaryEmbedding(x, position_ids, op.CastLike(op.Reshape(cos, flat), x),
                            op.CastLike(op.Reshape(sin, flat), x), num_heads=num_heads, interleaved=0)


def _rotary_standard(x, cos, sin, num_heads):
    return op23.RotaryEmbedding(x, op.CastLike(cos, x), op.CastLike(sin, x), num_heads=num_heads, interleaved=0)


def _attention_ort(q, k, v, num_heads, kv_heads, scale):
    if num_heads != kv_heads:
        raise ValueError("MultiHeadAttention needs as many key/value heads as query heads")
    return _MultiHeadAttention(q, k, v, num_heads=num_heads, scale=scale)


def _to_heads(x, heads: int):
    """[B, S, H*D] -> [B, H, S, D] in ONNX ops."""
    shape = op.Concat(op.Shape(x, start=0, end=2), op.Constant(value_ints=[heads, -1]), axis=0)
    return op.Transpose(op.Reshape(x, shape), perm=[0, 2, 1, 3])


def _from_heads(x):
    """[B, H, S, D] -> [B, S, H*D] in ONNX ops."""
    t = op.Transpose(x, perm=[0, 2, 1, 3])
    return op.Reshape(t, op.Concat(op.Shape(t, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))


# Attention-23 in its most widely parsed form: 4-D Q/K/V (heads from dim 1) and ONE output. TensorRT's parser
# rejects Attention's past/present (no KV-cache support through 11.x), so the cache grows by a plain Concat.
def _attention_standard(q, k, v, num_heads, kv_heads, scale):
    return _from_heads(_Attention1(_to_heads(q, num_heads), _to_heads(k, kv_heads), _to_heads(v, kv_heads),
                                   scale=scale))


def _window_ort(q, k, v, mask, num_heads, scale):
    return _MaskedMultiHeadAttention(q, k, v, None, op.Cast(mask, to=onnx.TensorProto.INT32), num_heads=num_heads,
                                     scale=scale)


def _window_standard(q, k, v, mask, num_heads, scale):
    # onnxruntime's Attention-23 wants the mask's query dim spelled out: [windows, 1, slots, slots]
    windows, slots = op.Shape(mask, start=0, end=1), op.Shape(mask, start=1, end=2)
    keep = op.Expand(op.Unsqueeze(op.Cast(mask, to=onnx.TensorProto.BOOL), [1, 2]),
                     op.Concat(windows, op.Constant(value_ints=[1]), slots, slots, axis=0))
    return _from_heads(_Attention1(_to_heads(q, num_heads), _to_heads(k, num_heads), _to_heads(v, num_heads), keep,
                                   scale=scale))


def _in_place_ort(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_heads, scale):
    return _GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                                num_heads=num_heads, kv_num_heads=kv_heads, scale=scale)


def _concat_standard(q, k, v, bias, past_key, past_value, num_heads, kv_heads, scale):
    present_k = op.Concat(past_key, _to_heads(k, kv_heads), axis=2)
    present_v = op.Concat(past_value, _to_heads(v, kv_heads), axis=2)
    y = _Attention1(_to_heads(q, num_heads), present_k, present_v, op.CastLike(bias, q), scale=scale)
    return _from_heads(y), present_k, present_v


def _rms_norm_ort(x, weight, eps):
    # x / sqrt(mean(x^2) + eps) * weight in float32: the pattern onnxruntime fuses into one
    # SimplifiedLayerNormalization kernel when it loads the graph. torch traces rsqrt as Sqrt + Reciprocal + Mul,
    # which it does not fuse (seven nodes per norm, 57 norms in the 2B's decoder).
    xf = op.Cast(x, to=onnx.TensorProto.FLOAT)
    variance = op.ReduceMean(op.Pow(xf, op.Constant(value_float=2.0)), op.Constant(value_ints=[-1]), keepdims=1)
    normed = op.Div(xf, op.Sqrt(op.Add(variance, op.Constant(value_float=eps))))
    return op.Mul(weight, op.CastLike(normed, x))


def _rms_norm_standard(x, weight, eps):
    return op23.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _gelu_tanh_ort(x):
    # One pass over the MLP's widest activation instead of seven (Pow, Mul, Add, Mul, Tanh, Add, Mul), which
    # onnxruntime 1.32 leaves unfused as torch traces them: 2-3 % of a Qwen3-VL fp32 image encode on a 2-core EPYC.
    return _FastGelu(x)


def _gelu_tanh_standard(x):
    return op23.Gelu(x, approximate="tanh")


VARIANT_OPSET = {"ort": 18, "standard": 18}   # the lowest default-domain opset each variant's graphs take
# onnxruntime's GroupQueryAttention (the ort variant's in-place KV cache) takes head sizes that are multiples of 8
# only: its CPU and CUDA kernels share the input check (contrib_ops/cpu/bert/group_query_attention_helper.h,
# "head_size must be a multiple of 8"), which fails at the first run, not at load.
GQA_HEAD_MULTIPLE = 8


def in_place_problem(head_dim: int) -> str | None:
    """Why the ort variant's decoder cannot hold heads of `head_dim` values, or None."""
    if head_dim % GQA_HEAD_MULTIPLE:
        return (f"the decoder's head size is {head_dim}, and onnxruntime's GroupQueryAttention (the ort variant's "
                f"in-place KV cache, on the CPU and CUDA) takes multiples of {GQA_HEAD_MULTIPLE} only; export with "
                f"--variant standard, whose attention takes any head size")
    return None
FUSED_STANDARD_OPSET = 23    # Attention, RotaryEmbedding, RMSNormalization exist from here (TensorRT >= 10.15)


@dataclass(frozen=True)
class Ops:
    """The functions the modules call; which ONNX ops they become is decided by `translations`."""

    rotary: Callable
    attention: Callable
    window_attention: Callable
    attention_in_place: Callable | None
    attention_concat: Callable | None
    rms_norm: Callable
    gelu_tanh: Callable


FUSED = Ops(rotary, attention, window_attention, attention_in_place, attention_concat, rms_norm, gelu_tanh)
# Standard graphs below opset 23: the same math traced from the reference functions into primitive ops
# (MatMul, Softmax, Mul, ...), which older TensorRT parses (JetPack 6: TensorRT 10.3).
DECOMPOSED = Ops(rotary_reference, attention_reference, window_attention_reference, None, attention_concat_reference,
                 rms_norm_reference, gelu_tanh_reference)


def flavor(variant: str, opset: int) -> Ops:
    return DECOMPOSED if variant == "standard" and opset < FUSED_STANDARD_OPSET else FUSED


def translations(variant: str) -> dict:
    """torch custom op -> ONNX translation for one graph variant (torch.onnx.export's custom_translation_table)."""
    ops = torch.ops.edgevl
    if variant == "ort":
        return {ops.rotary.default: _rotary_ort, ops.attention.default: _attention_ort,
                ops.window_attention.default: _window_ort, ops.attention_in_place.default: _in_place_ort,
                ops.rms_norm.default: _rms_norm_ort, ops.gelu_tanh.default: _gelu_tanh_ort}
    if variant == "standard":
        return {ops.rotary.default: _rotary_standard, ops.attention.default: _attention_standard,
                ops.window_attention.default: _window_standard, ops.attention_concat.default: _concat_standard,
                ops.rms_norm.default: _rms_norm_standard, ops.gelu_tanh.default: _gelu_tanh_standard}
    raise ValueError(f"unknown graph variant {variant!r}")
