"""Qwen3-VL's export modules: the vision tower with its DeepStack outputs, and both decoders with Qwen3 text layers.

What differs from Qwen2-VL (transformers 5 `qwen3_vl` / `qwen3_vl_moe`), and how the graphs take it:

* vision: 16-pixel patches (a row of pixel_values is 3 * 2 * 16 * 16 = 1536 values), a Conv3d patch embedding
  WITH bias, LayerNorm blocks with a gelu-tanh MLP, full attention per call (one image or one temporal patch),
  and a learned position table `pos_embed` [side * side, C] resampled to the patch grid: the runtime computes
  4 table rows and 4 bilinear weights per patch (runtime/inputs/pos_embed.py), the graph gathers and sums them.
  After the blocks listed in `deepstack_visual_indexes` the hidden state goes through its own merger
  (`deepstack_merger_list[k]`, LayerNorm after the 2x2 shuffle); the graph returns those levels stacked:

      pixel_values [N, 1536], rotary_pos_ids [N, 2], pos_embed_ids [N, 4] int64, pos_embed_weights [N, 4] float32
      -> image_embeds [N / 4, H], deepstack_embeds [levels, N / 4, H]

  One stacked output, not one per level: the decoder takes the levels as one input too, so the runtime
  scatters one tensor to the visual positions exactly as it scatters image_embeds, and the graphs' I/O
  does not depend on the number of levels.
* decoders: Qwen3 text layers (per-head RMSNorm q_norm / k_norm before RoPE, no qkv bias, an explicit head_dim),
  interleaved M-RoPE (edgevl.MRoPE with interleaved=1), and one more input, deepstack_embeds [levels, B, S, H]:
  level k is added to the residual stream after decoder layer k, as transformers' `_deepstack_process` adds it
  at the visual positions only. The input is dense, with zeros at text positions and in decode steps, so
  adding it everywhere is the same sum (x + 0 = x exactly) and batching, prefill chunks and the prefix cache
  need no mask. Its place among the inputs: after the length inputs, before the KV cache.
* qwen3_vl_moe: every sparse layer's MLP is `edgevl::moe` (export/moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from edgevl.artifact import names
from edgevl.artifact.model_config import QWEN3_MODEL_TYPES
from edgevl.errors import EdgevlError
from edgevl.export.modules import ConcatDecoder, InPlaceDecoder, VisionGraph
from edgevl.export.moe import interleave_gate_up, moe
from edgevl.export.ops import FUSED, Ops

MODEL_TYPES = QWEN3_MODEL_TYPES      # the families this module exports (artifact/model_config.py)


class Qwen3VisionGraph(VisionGraph):
    """pixel_values, rotary_pos_ids, pos_embed_ids, pos_embed_weights -> image_embeds, deepstack_embeds."""

    def __init__(self, visual: nn.Module, ops: Ops = FUSED):
        super().__init__(visual, ops)
        self.patch_bias = visual.patch_embed.proj.bias
        self.pos_embed = visual.pos_embed.weight
        self.levels = {int(block): level for level, block in enumerate(visual.config.deepstack_visual_indexes)}
        indexes = list(visual.config.deepstack_visual_indexes)
        if not indexes or sorted(set(indexes)) != indexes or indexes[-1] >= len(self.blocks):
            raise EdgevlError(f"deepstack_visual_indexes {indexes} must be one or more increasing ViT block indexes "
                              f"below the depth {len(self.blocks)}.")
        self.deepstack_mergers = visual.deepstack_merger_list
        self.gelu_tanh = getattr(visual.config, "hidden_act", None) == "gelu_pytorch_tanh"

    def forward(self, pixel_values, rotary_pos_ids, pos_embed_ids, pos_embed_weights):
        h = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight + self.patch_bias      # [N, E]
        # transformers multiplies the table's rows by float32 weights (so in float32), sums, then casts back
        rows = self.pos_embed[pos_embed_ids]                                                     # [N, 4, E]
        h = h + (rows * pos_embed_weights.float()[..., None]).sum(1).to(h.dtype)
        freqs = rotary_pos_ids[..., None].float() * self.inv_freq                               # [N, 2, D/4]
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)[None]                            # [1, N, D/2]
        cos, sin = angles.cos(), angles.sin()
        levels = []
        for i, blk in enumerate(self.blocks):
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin)
            h = h + self._mlp(blk.mlp, blk.norm2(h))
            if i in self.levels:
                levels.append(self.deepstack_mergers[self.levels[i]](h))
        return self.merger(h), torch.stack(levels)


    def _mlp(self, mlp: nn.Module, x):
        """linear_fc1 -> act -> linear_fc2, the hub's gelu_pytorch_tanh as the fused op; other acts as traced."""
        if not self.gelu_tanh:
            return mlp(x)
        return mlp.linear_fc2(self.ops.gelu_tanh(mlp.linear_fc1(x)))


class SparseMoE(nn.Module):
    """A Qwen3VLMoeTextSparseMoeBlock as edgevl::moe: router logits in the model's dtype, experts reordered once."""

    def __init__(self, block: nn.Module):
        super().__init__()
        experts = block.experts
        self.router = block.gate.weight                                          # [E, H]
        self.top_k = int(block.gate.top_k)
        self.fc1 = nn.Parameter(interleave_gate_up(experts.gate_up_proj.detach()), requires_grad=False)
        self.fc2 = experts.down_proj                                             # [E, H, I]

    def forward(self, x):
        logits = nn.functional.linear(x, self.router).reshape(-1, self.router.shape[0])      # [B * S, E]
        return moe(x, logits, self.fc1, self.fc2, self.top_k)


class _Layer(nn.Module):
    """A decoder layer as the decoders read it: the checkpoint's attention and norms, the MLP made exportable."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.self_attn = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        sparse = hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
        self.mlp = SparseMoE(layer.mlp) if sparse else layer.mlp


class _Qwen3Text:
    """What Qwen3's text layers change in a decoder: q_norm / k_norm, head_dim, interleaved M-RoPE, MoE MLPs."""

    def _qwen3(self, model: nn.Module) -> None:
        cfg = model.model.language_model.config
        if cfg.hidden_act != "silu":
            raise EdgevlError(f"the text layers use hidden_act {cfg.hidden_act!r}; edgevl exports silu (SwiGLU) "
                              f"MLPs and experts only.")
        self.layers = nn.ModuleList(_Layer(layer) for layer in self.layers)
        self.head_dim = int(cfg.head_dim)
        self.mrope_interleaved = True          # transformers' Qwen3-VL rotary always interleaves the sections
        self.deepstack_levels = len(model.config.vision_config.deepstack_visual_indexes)

    def qkv(self, attn, x, cos, sin):
        """q [B, S, Hq*D], k and v [B, S, Hkv*D]: q and k normalised per head (RMSNorm over D), then rotated."""
        def per_head(proj, norm, heads):
            y = proj(x)
            y = self._norm(norm, y.unflatten(-1, (heads, self.head_dim))).flatten(-2)
            return self.ops.rotary(y, cos, sin, heads)

        return (per_head(attn.q_proj, attn.q_norm, self.num_heads),
                per_head(attn.k_proj, attn.k_norm, self.num_kv_heads), attn.v_proj(x))

    def extra_inputs(self, batch: int, seq: int, dtype: torch.dtype, batch_dim, seq_dim) -> list[tuple]:
        """(name, example, dynamic dims) of the inputs beyond the Qwen2-VL decoder's, in forward's order."""
        example = torch.randn(self.deepstack_levels, batch, seq, self.norm.weight.shape[0], dtype=dtype)
        return [(names.DEEPSTACK_EMBEDS, example, {1: batch_dim, 2: seq_dim})]


class Qwen3InPlaceDecoder(_Qwen3Text, InPlaceDecoder):
    """InPlaceDecoder's inputs and deepstack_embeds [levels, B, S, H] after total_sequence_length."""

    def __init__(self, model: nn.Module, ops: Ops = FUSED):
        super().__init__(model, ops)
        self._qwen3(model)

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, deepstack_embeds,
                *past_key_values):
        return super().forward(inputs_embeds, position_ids, seqlens_k, total_sequence_length, *past_key_values,
                               layer_residuals=deepstack_embeds)


class Qwen3ConcatDecoder(_Qwen3Text, ConcatDecoder):
    """ConcatDecoder's inputs and deepstack_embeds [levels, B, S, H] after attention_mask."""

    def __init__(self, model: nn.Module, ops: Ops = FUSED):
        super().__init__(model, ops)
        self._qwen3(model)

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds, *past_key_values):
        return super().forward(inputs_embeds, position_ids, attention_mask, *past_key_values,
                               layer_residuals=deepstack_embeds)


DECODERS = {"ort": Qwen3InPlaceDecoder, "standard": Qwen3ConcatDecoder}
