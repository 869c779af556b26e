"""Named Qwen2-VL, Qwen2.5-VL and Qwen3-VL architectures, and the `transformers` config built from one.

This file owns the numbers: a frozen `ModelPreset` per architecture (the
real Qwen2-VL-2B/7B/72B-Instruct, Qwen2.5-VL-3B/7B-Instruct and Qwen3-VL-2B/4B/8B/30B-A3B-Instruct
shapes, truncated ones for quick benchmarks, and few-MB `tiny` models for tests) and
`build_config`, which turns a preset plus the ids of the tokenizer in use into
a `transformers.Qwen2VLConfig`, `Qwen2_5_VLConfig`, `Qwen3VLConfig` or `Qwen3VLMoeConfig`. Weights,
tokenizer files and the model folder are `random_model.py`'s job (`qwen3_vl.py`'s for Qwen3-VL's own files).

The real values come from the `config.json` of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct,
Qwen/Qwen2.5-VL-{3B,7B}-Instruct and Qwen/Qwen3-VL-{2B,4B,8B,30B-A3B}-Instruct.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The tiny tokenizer (see random_model.py) is a 2000-entry byte-level BPE plus
# Qwen2-VL's 14 special tokens, so the tiny embedding table has 2014 rows.
TINY_VOCAB_SIZE = 2014
# Qwen3-VL's tokenizer adds 12 more (tool calls, fill-in-the-middle, <think>): 26 after the same BPE.
QWEN3_TINY_VOCAB_SIZE = 2026
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build a Qwen2-VL config with random weights."""

    # Text decoder (the LLM).
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    # M-RoPE splits each head's rotary frequencies into (temporal, height,
    # width) sections; their sum must be head_dim // 2.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    # Vision tower (a ViT whose patch merger projects into the LLM width).
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Std of the random normal init. The real checkpoints say 0.02.
    initializer_range: float = 0.02
    # dtype the weights are written in (the real checkpoints are bfloat16).
    dtype: str = "bfloat16"
    # Qwen2.5-VL ("qwen2_5_vl"): RMSNorm and gated-SiLU vision blocks, window attention
    # (window_size pixels) except in the full-attention blocks, video time ids spaced by
    # tokens_per_second * seconds per temporal patch.
    family: str = "qwen2_vl"
    vision_intermediate_size: int = 3420
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    # Qwen3-VL ("qwen3_vl", "qwen3_vl_moe"): an explicit head_dim (4B: 32 heads x 128 != 2560), LayerNorm
    # gelu-tanh vision blocks with a learned position table (num_position_embeddings = side^2), DeepStack
    # mergers after the ViT blocks listed; MoE: every layer sparse, num_experts of moe_intermediate_size.
    explicit_head_dim: int | None = None
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_embed_dim // self.vision_num_heads


_QWEN2_VL_2B = ModelPreset(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)

_QWEN2_5_VL_3B = ModelPreset(
    family="qwen2_5_vl",
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=128000,
)

_TINY = ModelPreset(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=TINY_VOCAB_SIZE,
    tie_word_embeddings=False,
    mrope_section=(2, 3, 3),
    vision_depth=2,
    vision_embed_dim=64,
    vision_num_heads=4,
    initializer_range=0.2,
    dtype="float32",
)

_QWEN3_VL_2B = ModelPreset(
    family="qwen3_vl",
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    explicit_head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=5_000_000.0,
    mrope_section=(24, 20, 20),
    max_position_embeddings=262144,
    vision_depth=24,
    vision_embed_dim=1024,
    vision_num_heads=16,
    vision_intermediate_size=4096,
    patch_size=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=(5, 11, 17),
)
# The 8B and 30B-A3B share the larger ViT (27 blocks of 1152, DeepStack after 8, 16, 24).
_QWEN3_VL_8B = replace(_QWEN3_VL_2B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, tie_word_embeddings=False, vision_depth=27, vision_embed_dim=1152,
                       vision_intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24))
# Qwen3-VL in miniature: 4 text layers after 3 DeepStack levels (ViT blocks 0, 1, 2 of 4), head_dim 32 != 64 / 4
# (as the 4B's 32 x 128 != 2560), interleaved M-RoPE [6, 5, 5], the hub's 48x48 position table.
_QWEN3_TINY = replace(_QWEN3_VL_2B, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, explicit_head_dim=32, vocab_size=QWEN3_TINY_VOCAB_SIZE,
                      tie_word_embeddings=False, mrope_section=(6, 5, 5), max_position_embeddings=32768,
                      vision_depth=4, vision_embed_dim=64, vision_num_heads=4, vision_intermediate_size=96,
                      deepstack_visual_indexes=(0, 1, 2), initializer_range=0.2, dtype="float32")

PRESETS: dict[str, ModelPreset] = {
    # A few MB: 2 ViT blocks + 2 decoder layers, GQA (4 query / 2 kv heads),
    # head_dim 16 so mrope_section sums to 8. initializer_range is raised well
    # above 0.02 so the random model has confident, varied next-token choices:
    # with 0.02 every layer is ~identity and greedy decoding repeats itself
    # with top-1/top-2 margins of a few hundredths of a logit.
    "tiny": _TINY,
    # Qwen2.5-VL in miniature: 4 ViT blocks, the 2nd and 4th with full attention, windows of 56 px
    # (4x4 patches, 2x2 merged units) so that small test images hold several, odd-sized ones included.
    "tiny-2.5": replace(_TINY, family="qwen2_5_vl", vision_depth=4, vision_intermediate_size=96, window_size=56,
                        fullatt_block_indexes=(1, 3), tokens_per_second=2),
    "qwen2-vl-2b": _QWEN2_VL_2B,
    "qwen2-vl-7b": ModelPreset(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2-vl-72b": ModelPreset(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # The 2B's widths and vocabulary with 4 LLM and 4 ViT layers: per-layer
    # costs and the embedding/lm_head sizes are real, the file is ~1 GB.
    "qwen2-vl-2b-l4": ModelPreset(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        vision_depth=4,
    ),
    "qwen2.5-vl-3b": _QWEN2_5_VL_3B,
    "qwen2.5-vl-7b": replace(_QWEN2_5_VL_3B, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                             tie_word_embeddings=False),
    # The 3B's widths and vocabulary with 4 LLM layers and 8 ViT blocks (the 8th with full attention, as the 32nd
    # of the real tower is): window and full attention both run, per-layer costs are real.
    "qwen2.5-vl-3b-l4": replace(_QWEN2_5_VL_3B, num_hidden_layers=4, vision_depth=8, fullatt_block_indexes=(7,)),
    "qwen3-vl-tiny": _QWEN3_TINY,
    # The MoE in miniature: 8 experts of width 24, top 2 (hidden 64 is neither 24 nor 48, so the hub's expert
    # layout [E, H, 2I] / [E, I, H] cannot be mistaken for transformers' own [E, 2I, H] / [E, H, I]).
    "qwen3-vl-moe-tiny": replace(_QWEN3_TINY, family="qwen3_vl_moe", num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=48),
    "qwen3-vl-2b": _QWEN3_VL_2B,
    "qwen3-vl-4b": replace(_QWEN3_VL_2B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32),
    "qwen3-vl-8b": _QWEN3_VL_8B,
    "qwen3-vl-30b-a3b": replace(_QWEN3_VL_8B, family="qwen3_vl_moe", hidden_size=2048, intermediate_size=6144,
                                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    # The 2B's widths and vocabulary with 4 LLM layers and 18 ViT blocks: the fewest that keep the real
    # DeepStack blocks 5, 11, 17 (3 levels, added after LLM layers 0, 1, 2), per-layer costs are real.
    "qwen3-vl-2b-l4": replace(_QWEN3_VL_2B, num_hidden_layers=4, vision_depth=18),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; an EdgevlError naming the choices otherwise."""
    if name not in PRESETS:
        from edgevl.errors import EdgevlError

        raise EdgevlError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(preset: ModelPreset, token_ids: dict):
    """A `transformers.Qwen2VLConfig` for `preset`, wired to a tokenizer's ids.

    `token_ids` maps image_token_id, video_token_id, vision_start_token_id,
    vision_end_token_id, bos_token_id, eos_token_id and pad_token_id to ids
    (bos may be None: Qwen2 adds no BOS, but the real config still names
    <|endoftext|>).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if preset.family in QWEN3_FAMILIES:
        return build_qwen3_config(preset, token_ids)
    text_config = {
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "max_window_layers": preset.num_hidden_layers,
        "rms_norm_eps": preset.rms_norm_eps,
        "initializer_range": preset.initializer_range,
        # transformers 5 keeps rope settings in one dict; the real (v4) files
        # say rope_scaling {"type": "mrope"}, which v5 rewrites to "default".
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": preset.rope_theta,
            "mrope_section": list(preset.mrope_section),
        },
        "tie_word_embeddings": preset.tie_word_embeddings,
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
    }
    vision_config = {
        "depth": preset.vision_depth,
        "num_heads": preset.vision_num_heads,
        "patch_size": preset.patch_size,
        "temporal_patch_size": preset.temporal_patch_size,
        "spatial_merge_size": preset.spatial_merge_size,
        "in_channels": preset.in_channels,
        "initializer_range": preset.initializer_range,
    }
    common = dict(text_config=text_config, image_token_id=token_ids["image_token_id"],
                  video_token_id=token_ids["video_token_id"], vision_start_token_id=token_ids["vision_start_token_id"],
                  vision_end_token_id=token_ids["vision_end_token_id"],
                  # Tying is read from the outer config in transformers 5.
                  tie_word_embeddings=preset.tie_word_embeddings)
    if preset.family == "qwen2_5_vl":
        vision_config.update(hidden_size=preset.vision_embed_dim, intermediate_size=preset.vision_intermediate_size,
                             out_hidden_size=preset.hidden_size, hidden_act="silu", window_size=preset.window_size,
                             fullatt_block_indexes=list(preset.fullatt_block_indexes),
                             tokens_per_second=preset.tokens_per_second)
        return Qwen2_5_VLConfig(vision_config=vision_config, architectures=["Qwen2_5_VLForConditionalGeneration"],
                                **common)
    vision_config.update(embed_dim=preset.vision_embed_dim, hidden_size=preset.hidden_size,  # merger: LLM width
                         mlp_ratio=preset.vision_mlp_ratio)
    return Qwen2VLConfig(vision_config=vision_config, architectures=["Qwen2VLForConditionalGeneration"], **common)


def build_qwen3_config(preset: ModelPreset, token_ids: dict):
    """A `transformers.Qwen3VLConfig` (or `Qwen3VLMoeConfig`) for a Qwen3-VL preset, wired to a tokenizer's ids."""
    import transformers

    text_config = {
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.rms_norm_eps,
        "initializer_range": preset.initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": preset.rope_theta,
                            "mrope_section": list(preset.mrope_section), "mrope_interleaved": True},
        "attention_bias": False,
        "pad_token_id": None,
    }
    if preset.family == "qwen3_vl_moe":
        text_config.update(num_experts=preset.num_experts, num_experts_per_tok=preset.num_experts_per_tok,
                           moe_intermediate_size=preset.moe_intermediate_size, decoder_sparse_step=1,
                           mlp_only_layers=[], bos_token_id=token_ids["bos_token_id"],
                           eos_token_id=token_ids["eos_token_id"])
    vision_config = {
        "depth": preset.vision_depth,
        "hidden_size": preset.vision_embed_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": preset.vision_intermediate_size,
        "num_heads": preset.vision_num_heads,
        "in_channels": preset.in_channels,
        "patch_size": preset.patch_size,
        "spatial_merge_size": preset.spatial_merge_size,
        "temporal_patch_size": preset.temporal_patch_size,
        "out_hidden_size": preset.hidden_size,
        "num_position_embeddings": preset.num_position_embeddings,
        "deepstack_visual_indexes": list(preset.deepstack_visual_indexes),
        "initializer_range": preset.initializer_range,
    }
    cls, arch = {"qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
                 "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration")}[preset.family]
    return getattr(transformers, cls)(
        text_config=text_config, vision_config=vision_config, architectures=[arch],
        image_token_id=token_ids["image_token_id"], video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"], vision_end_token_id=token_ids["vision_end_token_id"],
        tie_word_embeddings=preset.tie_word_embeddings)
