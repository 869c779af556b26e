"""The two torch modules we export: `VisionGraph` and `DecoderGraph`.

Both reuse the checkpoint's own submodules (linear layers, norms, MLPs) and only
rewrite the parts that do not export well:

* vision: the stock tower splits attention by `grid_thw` with a data-dependent
  `split`, which bakes the traced image size into the graph. `VisionGraph` takes
  ONE attention segment per call (an image, or one temporal patch of a video) with
  the rotary ids computed by the runtime, so any number and size of images works
  and memory grows linearly with the number of images.
* decoder: plain tensors in and out (no cache objects), M-RoPE through the
  `edgevl::MRoPE` custom op, a causal + padding mask built in-graph from
  `attention_mask`, and only the last position's logits (what generation needs;
  lm_head over a whole prompt is the most expensive matmul of prefill).
"""

from __future__ import annotations

import torch
from torch import nn

from edgevl.export.mrope import mrope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionGraph(nn.Module):
    """pixel_values [N, C*T*P*P], rotary_pos_ids [N, 2] (h, w)  ->  image_embeds [N / merge^2, hidden]."""

    def __init__(self, visual: nn.Module):
        super().__init__()
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
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)                     # [N, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]                   # [N, 1, D]
        cos, sin = angles.cos(), angles.sin()
        for blk in self.blocks:
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin)
            h = h + blk.mlp(blk.norm2(h))
        return self.merger(h)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)         # [N, heads, D] each
        # Rotary in float32, as transformers does, then back to the working dtype.
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))                          # [heads, N, D]
        scores = (q @ k.transpose(1, 2)) * attn.scaling                           # [heads, N, N]
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (probs @ v).transpose(0, 1).reshape(n, -1)                         # [N, E]
        return attn.proj(out)


class DecoderGraph(nn.Module):
    """One graph for prefill and decode.

    inputs:  inputs_embeds [B, S, H], position_ids [3, B, S] int64,
             attention_mask [B, past + S] int64 (1 = real token, 0 = left padding),
             past_key_values.{i}.key / .value [B, kv_heads, past, head_dim]
    outputs: logits [B, vocab] (last position), present.{i}.key / .value [B, kv_heads, past + S, head_dim]
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        text = model.model.language_model
        cfg = text.config
        self.layers = text.layers
        self.norm = text.norm
        self.lm_head = model.lm_head
        self.register_buffer("inv_freq", text.rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.mrope_section = [int(s) for s in cfg.rope_parameters["mrope_section"]]
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def forward(self, inputs_embeds, position_ids, attention_mask, *past_key_values):
        bsz, seq, _ = inputs_embeds.shape
        past_len = past_key_values[0].shape[2]
        mask = self._additive_mask(attention_mask, seq, past_len, inputs_embeds.dtype)
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            attn_out, k, v = self._attention(layer.self_attn, layer.input_layernorm(h), position_ids, mask,
                                             past_key_values[2 * i], past_key_values[2 * i + 1])
            h = h + attn_out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            presents += [k, v]
        logits = self.lm_head(self.norm(h[:, -1, :]))                              # [B, vocab]
        return (logits, *presents)

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

    def _attention(self, attn, x, position_ids, mask, past_k, past_v):
        bsz, seq, _ = x.shape
        q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = mrope(q, position_ids, self.inv_freq, self.mrope_section)
        k = mrope(k, position_ids, self.inv_freq, self.mrope_section)
        k = torch.cat([past_k, k], dim=2)                                         # [B, kvH, T, D]
        v = torch.cat([past_v, v], dim=2)
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(bsz, self.num_kv_heads, group * seq, self.head_dim)         # GQA without repeating K/V
        scores = (q @ k.transpose(2, 3)) * attn.scaling                           # [B, kvH, g*S, T]
        scores = scores.view(bsz, self.num_heads, seq, -1) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = probs.view(bsz, self.num_kv_heads, group * seq, -1) @ v              # [B, kvH, g*S, D]
        out = out.view(bsz, self.num_heads, seq, self.head_dim).transpose(1, 2).reshape(bsz, seq, -1)
        return attn.o_proj(out), k, v
