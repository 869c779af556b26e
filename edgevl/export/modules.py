"""The torch modules we export: `VisionGraph` and the two decoders, `InPlaceDecoder` and `ConcatDecoder`.

All reuse the checkpoint's own submodules (linear layers, norms, MLPs) and express attention,
rotary embedding and RMSNorm through ops.py, whose translation per variant decides the ONNX ops:

* vision (both variants): ONE attention segment per call (an image, or one temporal patch of a
  video) with rotary ids computed by the runtime, so any number and size of images works and
  memory grows linearly with the number of images. Attention is one fused op per block
  (MultiHeadAttention / Attention-23): no [heads, N, N] scores in the graph, so onnxruntime's
  memory-efficient kernel keeps memory linear in patches too.
* InPlaceDecoder ("ort" variant, onnxruntime CPU and CUDA): GroupQueryAttention over one
  preallocated cache buffer per layer and K/V, [B, kv_heads, max_context, head_dim], that the
  runtime binds as past AND present (written by position, never copied). Row lengths come in as
  seqlens_k / total_sequence_length; rows are right-padded.
* ConcatDecoder ("standard" variant, TensorRT and other runtimes): ONNX-standard ops only; the
  cache grows by concatenation (present = past ++ new), padding and causality in an additive mask
  built from attention_mask; rows are left-padded.

Both decoders compute the M-RoPE tables once per call (edgevl::MRoPE), rotate q and k per layer,
and return only what generation needs: the logits of each row's last token and their argmax
(`next_token`, so a greedy loop can leave the logits on the device).
"""

from __future__ import annotations

import torch
from torch import nn

from edgevl.artifact import names
from edgevl.export.mrope import mrope
from edgevl.export.ops import FUSED, Ops


class VisionGraph(nn.Module):
    """pixel_values [N, C*T*P*P], rotary_pos_ids [N, 2] (h, w)  ->  image_embeds [N / merge^2, hidden]."""

    def __init__(self, visual: nn.Module, ops: Ops = FUSED):
        super().__init__()
        self.ops = ops
        self.blocks = visual.blocks
        self.merger = visual.merger
        # The patch embedding is a Conv3d whose kernel equals its input: a plain
        # matmul, which every backend and quantizer handles better than Conv3d.
        conv = visual.patch_embed.proj
        self.patch_weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).t().contiguous())
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone(), persistent=False)
        self.num_heads = visual.config.num_heads

    def forward(self, pixel_values: torch.Tensor, rotary_pos_ids: torch.Tensor) -> torch.Tensor:
        h = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight            # [N, E]
        freqs = rotary_pos_ids[..., None].float() * self.inv_freq                  # [N, 2, D/4]
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)[None]               # [1, N, D/2]
        cos, sin = angles.cos(), angles.sin()
        for blk in self.blocks:
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin)
            h = h + blk.mlp(blk.norm2(h))
        return self.merger(h)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, *unused) -> torch.Tensor:
        q, k, v = attn.qkv(x)[None].chunk(3, dim=-1)                               # [1, N, E] each
        # Rotary in float32, as transformers does, then back to the working dtype.
        q = self.ops.rotary(q.float(), cos, sin, self.num_heads).to(x.dtype)
        k = self.ops.rotary(k.float(), cos, sin, self.num_heads).to(x.dtype)
        out = self.ops.attention(q, k, v, self.num_heads, self.num_heads, float(attn.scaling))
        return attn.proj(out[0])


class WindowVisionGraph(VisionGraph):
    """Qwen2.5-VL's tower: window attention in most blocks, full attention in `fullatt_block_indexes`.

    pixel_values [N, C*T*P*P] and rotary_pos_ids [N, 2] in window order (runtime/inputs/windows.py), window_gather /
    window_mask [num_windows, slots], window_scatter [N]  ->  image_embeds [N / merge^2, hidden] in window order.
    The hidden state stays [N, E]; a window block gathers it into [num_windows, slots, E] (padding slots read a
    zero row), attends within each window under the key mask, and scatters back.
    """

    def __init__(self, visual: nn.Module, ops: Ops = FUSED):
        super().__init__(visual, ops)
        self.full = {int(i) for i in visual.config.fullatt_block_indexes}

    def forward(self, pixel_values, rotary_pos_ids, window_gather, window_mask, window_scatter):
        h = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight            # [N, E]
        freqs = rotary_pos_ids[..., None].float() * self.inv_freq                  # [N, 2, D/4]
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)[None]               # [1, N, D/2]
        cos, sin = angles.cos(), angles.sin()
        windows = (window_gather, window_mask, window_scatter)
        for i, blk in enumerate(self.blocks):
            attend = self._attention if i in self.full else self._window_attention
            h = h + attend(blk.attn, self._norm(blk.norm1, h), cos, sin, *([] if i in self.full else windows))
            h = h + blk.mlp(self._norm(blk.norm2, h))
        return self.merger(h)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's block norms are RMSNorms: through ops.rms_norm, as in the decoders."""
        return self.ops.rms_norm(x, norm.weight, float(norm.variance_epsilon))

    def _window_attention(self, attn, x, cos, sin, gather, mask, scatter):
        q, k, v = attn.qkv(x)[None].chunk(3, dim=-1)                               # [1, N, E] each
        q = self.ops.rotary(q.float(), cos, sin, self.num_heads).to(x.dtype)
        k = self.ops.rotary(k.float(), cos, sin, self.num_heads).to(x.dtype)

        def windows(t):                                                             # [1, N, E] -> [W, slots, E]
            padded = torch.cat([t[0], t.new_zeros((1, t.shape[-1]))])
            return padded[gather.reshape(-1)].reshape(*gather.shape, -1)

        out = self.ops.window_attention(windows(q), windows(k), windows(v), mask, self.num_heads, float(attn.scaling))
        return attn.proj(out.reshape(-1, out.shape[-1])[scatter])


class _Decoder(nn.Module):
    """What both decoders share: the checkpoint's layers, M-RoPE tables once per call, q/k/v, the head."""

    def __init__(self, model: nn.Module, ops: Ops = FUSED):
        super().__init__()
        self.ops = ops
        text = model.model.language_model
        cfg = text.config
        self.layers = text.layers
        self.norm = text.norm
        self.lm_head = model.lm_head
        self.register_buffer("inv_freq", text.rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.mrope_section = [int(s) for s in cfg.rope_parameters["mrope_section"]]
        self.mrope_interleaved = False             # Qwen3-VL: frequency slots cycle t, h, w (mrope.slot_rows)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def qkv(self, attn, x, cos, sin):
        """q [B, S, Hq*D], k and v [B, S, Hkv*D], q and k rotated."""
        rotary = self.ops.rotary
        return (rotary(attn.q_proj(x), cos, sin, self.num_heads), rotary(attn.k_proj(x), cos, sin, self.num_kv_heads),
                attn.v_proj(x))

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D/2]: the M-RoPE tables, once per call (edgevl.MRoPE)."""
        return mrope(position_ids, self.inv_freq, self.mrope_section, self.mrope_interleaved)

    @staticmethod
    def add_residual(h: torch.Tensor, i: int, layer_residuals: torch.Tensor | None) -> torch.Tensor:
        """After layer i: h + layer_residuals[i] while i < L (Qwen3-VL's DeepStack, [L, B, S, H]), else h."""
        return h if layer_residuals is None or i >= layer_residuals.shape[0] else h + layer_residuals[i]

    def head(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """last hidden state per row [B, H] -> logits [B, vocab] and their argmax [B]."""
        logits = self.lm_head(self._norm(self.norm, last))
        return logits, logits.argmax(-1)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The checkpoint's RMSNorm through ops.rms_norm (one fusable pattern or op per variant)."""
        return self.ops.rms_norm(x, norm.weight, float(norm.variance_epsilon))


class InPlaceDecoder(_Decoder):
    """One graph for prefill and decode over a cache written in place.

    inputs:  inputs_embeds [B, S, H], position_ids [3, B, S] int64, seqlens_k [B] int32 (each row's length after
             this call, minus one), total_sequence_length [] int32 (their maximum + 1, at least S),
             past_key_values.{i}.key / .value [B, kv_heads, max_context, head_dim]
    outputs: logits [B, vocab] (each row's last real token), next_token [B] int64,
             present.{i}.key / .value [B, kv_heads, max_context, head_dim] (the same buffers as past)
    """

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, *past_key_values,
                layer_residuals=None):
        cos, sin = self.rope(position_ids)                                         # [B, S, D/2], once
        h, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self.qkv(attn, self._norm(layer.input_layernorm, h), cos, sin)
            out, key, value = self.ops.attention_in_place(q, k, v, past_key_values[2 * i], past_key_values[2 * i + 1],
                                                 seqlens_k, total_sequence_length, self.num_heads,
                                                 self.num_kv_heads, float(attn.scaling))
            h = h + attn.o_proj(out)
            h = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
            h = self.add_residual(h, i, layer_residuals)
            presents += [key, value]
        return (*self.head(self._last_tokens(h, position_ids, seqlens_k)), *presents)

    @staticmethod
    def _last_tokens(h: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, H]: each row's last real token (right-padded prompts end at seqlens_k, a chunk after a
        cache at S - 1). The index comes from data, not from the graph's shapes: positions 0..S-1 are a CumSum
        over ones shaped like a row of position_ids. onnxruntime computes shape arithmetic on the host, and a host
        value feeding a GPU node is a copy (a Memcpy node) that rules out CUDA graphs on ort-cuda
        (tests/runtime/backends/test_ort_placement.py checks the exported graphs)."""
        ones = position_ids[0] * 0 + 1                                               # [B, S] int64, on the device
        positions = torch.cumsum(ones, dim=1) - 1                                    # 0 .. S-1 per row
        last = torch.minimum(seqlens_k.to(torch.int64), positions[:, -1])            # [B]
        return torch.gather(h, 1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]


class ConcatDecoder(_Decoder):
    """One graph for prefill and decode, ONNX-standard ops only.

    inputs:  inputs_embeds [B, S, H], position_ids [3, B, S] int64,
             attention_mask [B, past + S] int64 (1 = real token, 0 = left padding),
             past_key_values.{i}.key / .value [B, kv_heads, past, head_dim]
    outputs: logits [B, vocab] (last position), next_token [B] int64,
             present.{i}.key / .value [B, kv_heads, past + S, head_dim]
    """

    def forward(self, inputs_embeds, position_ids, attention_mask, *past_key_values, layer_residuals=None):
        seq = inputs_embeds.shape[1]
        past_len = past_key_values[0].shape[2]
        bias = self._additive_mask(attention_mask, seq, past_len, inputs_embeds.dtype)
        cos, sin = self.rope(position_ids)
        h, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            norm = layer.input_layernorm
            q, k, v = self.qkv(attn, self._norm(norm, h), cos, sin)
            out, key, value = self.ops.attention_concat(q, k, v, bias, past_key_values[2 * i], past_key_values[2 * i + 1],
                                               self.num_heads, self.num_kv_heads, float(attn.scaling))
            h = h + attn.o_proj(out)
            h = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
            h = self.add_residual(h, i, layer_residuals)
            presents += [key, value]
        logits = self.lm_head(self._norm(self.norm, h[:, -1, :]))
        return (logits, logits.argmax(-1), *presents)

    @staticmethod
    def _additive_mask(attention_mask, seq: int, past_len, dtype) -> torch.Tensor:
        """[B, 1, S, past+S]: 0 where a query may attend, the dtype's minimum elsewhere.

        A query always sees itself, so rows of left-padding tokens are never fully
        masked (a fully masked row turns into NaN and poisons the cache).
        """
        total = attention_mask.shape[1]
        key_pos = torch.arange(total, device=attention_mask.device)                # [T]
        query_pos = torch.arange(seq, device=attention_mask.device) + past_len     # [S]
        causal = key_pos[None, :] <= query_pos[:, None]                            # [S, T]
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()     # [B, 1, S, T]
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None, None]
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


VISION = {"qwen2_vl": VisionGraph, "qwen2_5_vl": WindowVisionGraph}
DECODERS = {"ort": InPlaceDecoder, "standard": ConcatDecoder}
KV_CACHE = {"ort": names.IN_PLACE, "standard": names.CONCAT}     # GraphSpec.kv_cache of each variant's decoder
