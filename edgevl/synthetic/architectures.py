"""Named Qwen2-VL architectures, and the `transformers` config built from one.

This file owns the numbers: a frozen `ModelPreset` per architecture (the
real Qwen2-VL-2B/7B/72B-Instruct shapes, a truncated 2B for quick benchmarks,
and a few-MB `tiny` model for tests) and `build_config`, which turns a preset
plus the ids of the tokenizer in use into a `transformers.Qwen2VLConfig`.
Weights, tokenizer files and the model folder are `random_model.py`'s job.

The real values come from the `config.json` of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct.
"""

from __future__ import annotations

from dataclasses import dataclass

# The tiny tokenizer (see random_model.py) is a 2000-entry byte-level BPE plus
# Qwen2-VL's 14 special tokens, so the tiny embedding table has 2014 rows.
TINY_VOCAB_SIZE = 2014


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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

PRESETS: dict[str, ModelPreset] = {
    # A few MB: 2 ViT blocks + 2 decoder layers, GQA (4 query / 2 kv heads),
    # head_dim 16 so mrope_section sums to 8. initializer_range is raised well
    # above 0.02 so the random model has confident, varied next-token choices:
    # with 0.02 every layer is ~identity and greedy decoding repeats itself
    # with top-1/top-2 margins of a few hundredths of a logit.
    "tiny": ModelPreset(
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
    ),
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
    from transformers import Qwen2VLConfig

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
        "embed_dim": preset.vision_embed_dim,
        "hidden_size": preset.hidden_size,  # the merger outputs LLM-width rows
        "num_heads": preset.vision_num_heads,
        "mlp_ratio": preset.vision_mlp_ratio,
        "patch_size": preset.patch_size,
        "temporal_patch_size": preset.temporal_patch_size,
        "spatial_merge_size": preset.spatial_merge_size,
        "in_channels": preset.in_channels,
        "initializer_range": preset.initializer_range,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
        # Tying is read from the outer config in transformers 5.
        tie_word_embeddings=preset.tie_word_embeddings,
        architectures=["Qwen2VLForConditionalGeneration"],
    )
