"""A complete Qwen2-VL-Instruct model folder with random weights, made offline.

This file owns the stand-in checkpoint that tests and benchmarks use instead
of downloaded weights: `write_random_model` writes the files a real
Qwen/Qwen2-VL-*-Instruct folder has (config.json, generation_config.json,
model.safetensors, tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json, chat_template.jinja, preprocessor_config.json), so that
`Qwen2VLForConditionalGeneration`, `AutoTokenizer` and
`Qwen2VLImageProcessorPil` load it with `from_pretrained` and no network.

The tokenizer is a 2000-entry byte-level BPE trained here, in well under a
second, on `assets/tokenizer_corpus.txt` with the Qwen2 pre-tokenizer, plus
Qwen2-VL's 14 special tokens in their real order. config.json is written in the hub's
layout (transformers 4: text settings at the top level, rope_scaling "mrope"), and the
weights under the hub's key names, so exports take the path a downloaded checkpoint takes. Training is deterministic,
so it is not cached. The chat template is the real one
(`assets/qwen2_vl_chat_template.jinja`). Shapes come from `architectures.py`.

    python -m edgevl.synthetic.random_model OUT_DIR [--preset NAME] [--seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgevl.synthetic.architectures import QWEN3_FAMILIES, ModelPreset, build_config, get_preset
from edgevl.synthetic.pieces import (
    ASSETS,
    SPECIAL_TOKENS,
    write_json,
    special_token_ids,
    train_tokenizer,
    write_weights,
)

CHAT_TEMPLATE_PATH = ASSETS / "qwen2_vl_chat_template.jinja"

# Image preprocessing of the real checkpoints (CLIP mean/std, 14-px patches,
# 2x2 merge, 4..16384 merged tokens per image).
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 28 * 28 * 16384  # 12845056
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_tokenizer_files(tokenizer, out_dir: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, chat_template.jinja.

    tokenizer_config.json mirrors the real (transformers-4 era) file, chat
    template inline included; chat_template.jinja is how transformers 5 saves
    a template, and it wins over the inline copy when both exist.
    """
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt, as the real folder has
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_json(out_dir / "tokenizer_config.json", config)


def write_preprocessor_config(out_dir: Path, preset: ModelPreset) -> None:
    """preprocessor_config.json: the real file's keys plus transformers 5's own.

    The real file says min_pixels/max_pixels; transformers 5 maps them onto
    size.shortest_edge/longest_edge (pixel counts, not edges) and saves the
    latter. Both are written, with the same values, so old and new readers agree.
    """
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": MAX_PIXELS,
        "merge_size": preset.spatial_merge_size,
        "min_pixels": MIN_PIXELS,
        "patch_size": preset.patch_size,
        "processor_class": "Qwen2_5_VLProcessor" if preset.family == "qwen2_5_vl" else "Qwen2VLProcessor",
        "resample": 3,  # PIL bicubic
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": preset.temporal_patch_size,
    }
    write_json(out_dir / "preprocessor_config.json", config)


# The text settings a hub config.json keeps at its top level (the v4 layout), next to vision_config.
_HUB_TEXT_KEYS = ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
                  "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers",
                  "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                  "sliding_window", "use_cache", "use_sliding_window", "vocab_size")
_HUB_VISION_KEYS = {
    "qwen2_vl": ("depth", "embed_dim", "mlp_ratio", "num_heads", "hidden_size", "patch_size", "spatial_merge_size",
                 "temporal_patch_size"),
    "qwen2_5_vl": ("depth", "hidden_act", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                   "patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes", "tokens_per_second",
                   "temporal_patch_size"),
}


def hub_config(config, dtype: str) -> dict:
    """`config` as the hub's Qwen2-VL / Qwen2.5-VL config.json has it (the transformers 4 layout every
    published checkpoint uses): text settings at the top level, rope_theta and rope_scaling
    {"type": "mrope", "mrope_section"} instead of rope_parameters, vision_config with in_chans and
    spatial_patch_size, torch_dtype. transformers 5 reads it back to an equal config."""
    full = config.to_dict()
    text, vision = full["text_config"], dict(full["vision_config"])
    out = {"architectures": full["architectures"], "model_type": full["model_type"],
           **{key: text[key] for key in _HUB_TEXT_KEYS if key in text}}
    rope = text["rope_parameters"]
    out.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
               image_token_id=full["image_token_id"], video_token_id=full["video_token_id"],
               vision_start_token_id=full["vision_start_token_id"], vision_end_token_id=full["vision_end_token_id"],
               vision_token_id=full["vision_start_token_id"] + 2,      # <|vision_pad|>
               tie_word_embeddings=full["tie_word_embeddings"], torch_dtype=dtype, transformers_version="4.49.0")
    keys = _HUB_VISION_KEYS[full["model_type"]]
    out["vision_config"] = {**{key: vision[key] for key in keys}, "in_chans": vision["in_channels"],
                            "spatial_patch_size": vision["patch_size"]}
    return out


def write_random_model(out_dir, preset: str | ModelPreset = "tiny", seed: int = 0, dtype: str | None = None) -> Path:
    """Write a loadable Qwen2-VL / Qwen2.5-VL / Qwen3-VL Instruct folder with random weights; return its path.

    `preset` names an entry of presets.PRESETS (or is a ModelPreset); `dtype`
    (e.g. "float32") overrides the preset's weight dtype. Same arguments, same bytes.
    """
    spec = preset if isinstance(preset, ModelPreset) else get_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.family in QWEN3_FAMILIES:
        from edgevl.synthetic.qwen3_vl import write_qwen3_files
        return write_qwen3_files(out, spec, seed, dtype or spec.dtype)
    tokenizer = train_tokenizer()
    ids = special_token_ids(tokenizer)
    config = build_config(spec, ids)
    write_weights(out, config, ids, seed, dtype or spec.dtype)
    write_json(out / "config.json", hub_config(config, dtype or spec.dtype))     # what a hub checkpoint has
    write_tokenizer_files(tokenizer, out)
    write_preprocessor_config(out, spec)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the preset's)")
    args = parser.parse_args(argv)
    path = write_random_model(args.out_dir, preset=args.preset, seed=args.seed, dtype=args.dtype)
    print(path)


if __name__ == "__main__":
    main()
