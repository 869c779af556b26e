"""A Qwen3-VL-Instruct model folder with random weights, in the hub's layout.

What a downloaded Qwen/Qwen3-VL-*-Instruct folder holds, written offline for a preset of architectures.py:

    config.json                     the hub's (transformers 4.57) layout: text settings in text_config with the
                                    legacy `rope_scaling` {mrope_interleaved, mrope_section, rope_type} and
                                    `rope_theta`, vision_config with the legacy model_type "qwen3_vl" /
                                    "qwen3_vl_moe" (transformers 5 reads it back to an equal config)
    model.safetensors               bf16 (the preset's dtype) under the hub's key names; no lm_head when tied;
                                    MoE experts stored as the hub stores them, experts.gate_up_proj [E, H, 2I]
                                    and experts.down_proj [E, I, H] (transformers 5 transposes them on load)
    generation_config.json          eos [<|im_end|>, <|endoftext|>], top_k 20, top_p 0.8, temperature 0.7
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
                                    the tiny BPE of random_model.py with Qwen3's 26 added tokens in the real order
                                    (<|endoftext|> .. <|video_pad|> special; <tool_call> .. </think> not)
    chat_template.json              the Instruct template (no default system turn)
    preprocessor_config.json        mean / std 0.5, 16-px patches, size {shortest_edge 65536, longest_edge 16777216}
    video_preprocessor_config.json  size {shortest_edge 4096, longest_edge 25165824} (a total-pixel budget)
"""

from __future__ import annotations

from pathlib import Path

from edgevl.synthetic.architectures import ModelPreset, build_config
from edgevl.synthetic.pieces import ASSETS, special_token_ids, train_tokenizer, write_json, write_weights

CHAT_TEMPLATE_PATH = ASSETS / "qwen3_vl_chat_template.jinja"

# Qwen3's added tokens in id order (151643..151668 in the real tokenizer): (content, special).
ADDED_TOKENS = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                          "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                          "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                           "<think>", "</think>")),
)
IMAGE_SIZE = {"longest_edge": 16777216, "shortest_edge": 65536}     # pixels: 16384 x 32^2, 64 x 32^2
VIDEO_SIZE = {"longest_edge": 25165824, "shortest_edge": 4096}      # pixels over all frames: 768 x 32^2 x 32
HALF = [0.5, 0.5, 0.5]

_TEXT_KEYS = ("attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size", "initializer_range",
              "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
              "num_key_value_heads", "rms_norm_eps", "use_cache", "vocab_size")
_MOE_TEXT_KEYS = ("decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size", "num_experts_per_tok",
                  "router_aux_loss_coef")
_VISION_KEYS = ("deepstack_visual_indexes", "depth", "hidden_act", "hidden_size", "in_channels", "initializer_range",
                "intermediate_size", "num_heads", "num_position_embeddings", "out_hidden_size", "patch_size",
                "spatial_merge_size", "temporal_patch_size")




def hub_config(config, ids: dict, dtype: str) -> dict:
    """`config` as the hub's Qwen3-VL / Qwen3-VL-MoE config.json has it."""
    full = config.to_dict()
    text, vision = full["text_config"], full["vision_config"]
    rope = text["rope_parameters"]
    moe = full["model_type"] == "qwen3_vl_moe"
    text_out = {key: text[key] for key in _TEXT_KEYS}
    text_out.update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], dtype=dtype,
                    model_type=f"{full['model_type']}_text", rope_theta=rope["rope_theta"],
                    rope_scaling={"mrope_interleaved": True, "mrope_section": rope["mrope_section"],
                                  "rope_type": "default"},
                    tie_word_embeddings=full["tie_word_embeddings"])
    if moe:
        text_out.update({key: text[key] for key in _MOE_TEXT_KEYS}, num_experts=text["num_local_experts"],
                        norm_topk_prob=True)
    return {"architectures": full["architectures"], "dtype": dtype, "image_token_id": full["image_token_id"],
            "model_type": full["model_type"], "text_config": dict(sorted(text_out.items())),
            "tie_word_embeddings": full["tie_word_embeddings"], "transformers_version": "4.57.0.dev0",
            "video_token_id": full["video_token_id"],
            "vision_config": dict(sorted({**{key: vision[key] for key in _VISION_KEYS},
                                          "model_type": full["model_type"]}.items())),
            "vision_end_token_id": full["vision_end_token_id"],
            "vision_start_token_id": full["vision_start_token_id"]}


def generation_config(ids: dict):
    """Qwen3-VL-Instruct's generation_config.json with this tokenizer's ids."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"], do_sample=True,
                            eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],     # <|im_end|>, <|endoftext|>
                            top_k=20, top_p=0.8, repetition_penalty=1.0, temperature=0.7)


def to_hub_expert_layout(weights: Path) -> None:
    """Rewrite the experts of a transformers-5 save ([E, 2I, H], [E, H, I]) the way the hub stores them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    for key in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})


def write_tokenizer_files(tokenizer, out_dir: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.json, as the hub has them."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": special} for t, special in ADDED_TOKENS}
    write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 262144, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")})


def write_processor_files(out_dir: Path, preset: ModelPreset) -> None:
    """preprocessor_config.json and video_preprocessor_config.json, as the hub has them."""
    common = {"patch_size": preset.patch_size, "temporal_patch_size": preset.temporal_patch_size,
              "merge_size": preset.spatial_merge_size, "image_mean": HALF, "image_std": HALF,
              "processor_class": "Qwen3VLProcessor"}
    write_json(out_dir / "preprocessor_config.json",
                {"size": IMAGE_SIZE, **common, "image_processor_type": "Qwen2VLImageProcessorFast"})
    write_json(out_dir / "video_preprocessor_config.json",
                {"size": VIDEO_SIZE, **common, "video_processor_type": "Qwen3VLVideoProcessor"})


def write_qwen3_files(out: Path, preset: ModelPreset, seed: int, dtype: str) -> Path:
    """Every file of a Qwen3-VL-Instruct folder in `out` (random_model.write_random_model's Qwen3-VL branch)."""
    tokenizer = train_tokenizer(added_tokens=ADDED_TOKENS)
    ids = special_token_ids(tokenizer)
    config = build_config(preset, ids)
    write_weights(out, config, ids, seed, dtype, generation=generation_config(ids))
    if preset.family == "qwen3_vl_moe":
        for weights in sorted(out.glob("*.safetensors")):
            to_hub_expert_layout(weights)
    write_json(out / "config.json", hub_config(config, ids, dtype))
    write_tokenizer_files(tokenizer, out)
    write_processor_files(out, preset)
    return out
