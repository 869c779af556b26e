"""`ModelConfig`: the model facts the runtime needs, flattened from the checkpoint's config.json into the manifest
(`Manifest.config`), validated on the way in (a bad field is one sentence naming it) so nothing downstream hard-codes
a size or guesses a family."""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgevl.artifact.fields import Fields as _Fields
from edgevl.artifact.fields import ManifestError

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN3_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


@dataclass(frozen=True)
class ModelConfig:
    """The config values the runtime needs, flattened from the checkpoint's config.json."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    tie_word_embeddings: bool
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    vision_embed_dim: int
    vision_depth: int
    model_type: str = "qwen2_vl"                  # MODEL_TYPES
    intermediate_size: int | None = None          # the LLM MLP's width
    vision_intermediate_size: int | None = None   # the ViT MLP's width (Qwen2.5-VL: gated, 3 matrices)
    vision_window_size: int | None = None         # Qwen2.5-VL: window attention, in pixels
    vision_fullatt_blocks: tuple[int, ...] = ()   # Qwen2.5-VL: the blocks that attend over the whole image
    tokens_per_second: float | None = None        # Qwen2.5-VL: video time ids per second
    mrope_interleaved: bool = False               # Qwen3-VL: M-RoPE frequency slots cycle t, h, w (export/mrope.py)
    num_position_embeddings: int | None = None    # Qwen3-VL: rows of the learned vision position table (a square)
    vision_deepstack_indexes: tuple[int, ...] = ()  # Qwen3-VL: ViT blocks whose merged outputs feed decoder layers
                                                  # 0, 1, ... (DeepStack; one level each)
    num_experts: int | None = None                # Qwen3-VL-MoE: experts of each sparse layer
    num_experts_per_tok: int | None = None        # how many of them each token runs
    moe_intermediate_size: int | None = None      # each expert's MLP width

    @property
    def timestamped_video(self) -> bool:
        """Qwen3-VL's video: sampled and resized over the whole clip, each temporal patch announced by its time
        in the prompt (`<1.5 seconds>`) and positioned as its own (1, h, w) grid."""
        return self.model_type in QWEN3_MODEL_TYPES

    @classmethod
    def parse(cls, f: _Fields) -> "ModelConfig":
        values = {}
        for fld in fields(cls):
            if fld.name == "rope_theta":
                values[fld.name] = f.float(fld.name)
            elif fld.name in ("mrope_section", "eos_token_id"):
                values[fld.name] = f.ints(fld.name, minimum=0)
            elif fld.name == "pad_token_id":
                values[fld.name] = f.int(fld.name, default=None, minimum=0)
            elif fld.name == "tie_word_embeddings":
                values[fld.name] = f.bool(fld.name)
            elif fld.name == "model_type":
                values[fld.name] = f.str(fld.name, default="qwen2_vl", choices=MODEL_TYPES)
            elif fld.name in ("vision_window_size", "intermediate_size", "vision_intermediate_size",
                              "num_position_embeddings", "num_experts", "num_experts_per_tok",
                              "moe_intermediate_size"):
                values[fld.name] = f.int(fld.name, default=None, minimum=1)
            elif fld.name in ("vision_fullatt_blocks", "vision_deepstack_indexes"):
                values[fld.name] = f.ints(fld.name, default=(), minimum=0)
            elif fld.name == "mrope_interleaved":
                values[fld.name] = f.bool(fld.name, default=False)
            elif fld.name == "tokens_per_second":
                values[fld.name] = f.float(fld.name, default=None)
                if values[fld.name] is not None and values[fld.name] <= 0:
                    raise ManifestError("manifest field 'config.tokens_per_second' must be positive.")
            else:
                values[fld.name] = f.int(fld.name, minimum=0 if fld.name.endswith("token_id") else 1)
        config = cls(**values)
        if not config.eos_token_id:
            raise ManifestError("manifest field 'config.eos_token_id' is empty.")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ManifestError("manifest field 'config.num_key_value_heads' does not divide num_attention_heads.")
        if 2 * sum(config.mrope_section) != config.head_dim:
            raise ManifestError("manifest field 'config.mrope_section' does not add up to head_dim / 2.")
        if (config.model_type == "qwen2_5_vl") != (config.vision_window_size is not None):
            raise ManifestError("manifest field 'config.vision_window_size' is set for qwen2_5_vl models only.")
        config._check_qwen3()
        return config

    def _check_qwen3(self) -> None:
        """Qwen3-VL's fields: set for its model types only, and consistent."""
        qwen3 = self.model_type in QWEN3_MODEL_TYPES
        if self.mrope_interleaved != qwen3:
            raise ManifestError("manifest field 'config.mrope_interleaved' is true for qwen3_vl models only.")
        table = self.num_position_embeddings
        if qwen3 != (table is not None) or (qwen3 and int(table ** 0.5) ** 2 != table):
            raise ManifestError("manifest field 'config.num_position_embeddings' must be a square table size, "
                                "set for qwen3_vl models only.")
        levels = self.vision_deepstack_indexes
        if any(b <= a for a, b in zip(levels, levels[1:])) or any(i >= self.vision_depth for i in levels) or \
                (levels and not qwen3):
            raise ManifestError("manifest field 'config.vision_deepstack_indexes' must be increasing ViT block "
                                "indexes below vision_depth, for qwen3_vl models only.")
        moe = (self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size)
        if self.model_type != "qwen3_vl_moe":
            moe_ok = moe == (None, None, None)
        else:
            moe_ok = None not in moe and self.num_experts_per_tok <= self.num_experts
        if not moe_ok:
            raise ManifestError("manifest field 'config.num_experts' / num_experts_per_tok / moe_intermediate_size "
                                "must all be set (per token at most num_experts) for qwen3_vl_moe models only.")

    @property
    def deepstack_levels(self) -> int:
        """How many DeepStack feature levels the vision graph returns and the decoder takes (0 before Qwen3-VL)."""
        return len(self.vision_deepstack_indexes)

    def to_json(self) -> dict:
        out = {fld.name: getattr(self, fld.name) for fld in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def kv_cache_bytes(self, batch: int, positions: int, itemsize: int) -> int:
        """Bytes of keys and values for `positions` tokens of `batch` rows:
        2 (key, value) x layers x batch x kv_heads x positions x head_dim x itemsize.

        Qwen2-VL-2B, fp16, batch 1, 32768 positions: 2*28*1*2*32768*128*2 = 0.94 GB."""
        return 2 * self.num_hidden_layers * batch * self.num_key_value_heads * positions * self.head_dim * itemsize
