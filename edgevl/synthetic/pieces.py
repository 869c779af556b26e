"""The pieces every synthetic checkpoint is made of, whatever its family: the stand-in byte-level BPE tokenizer
(trained on a small corpus, Qwen2's pre-tokenizer, the model's special tokens after it), the ids those special tokens
get, and random weights saved in the hub's layout."""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CORPUS_PATH = ASSETS / "tokenizer_corpus.txt"

# Size of the trained BPE vocabulary; the special tokens come after it, as
# in the real tokenizer (151643 regular tokens, then <|endoftext|> ...).
BPE_VOCAB_SIZE = 2000

# Qwen2-VL's added tokens, in id order (151643..151656 in the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# transformers' Qwen2Tokenizer splits text with this regex before byte-level
# BPE; it rebuilds the pipeline from this constant when loading, so the
# tokenizer.json written here must use the same one to agree with it.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(corpus_path: Path = CORPUS_PATH, vocab_size: int = BPE_VOCAB_SIZE,
                    added_tokens: tuple[tuple[str, bool], ...] | None = None):
    """Train the tiny byte-level BPE and add Qwen2-VL's special tokens (or `added_tokens`: (content, special)
    pairs in id order, Qwen3-VL's).

    Returns a `tokenizers.Tokenizer` with ids 0..vocab_size-1 for BPE pieces
    and vocab_size.. for SPECIAL_TOKENS. Same corpus, same bytes out (checked
    across processes, whose Rust hash seeds differ): the trainer orders merges
    by count, then by pair id.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        # All 256 byte symbols, so any UTF-8 text encodes without an unk.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = Path(corpus_path).read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"corpus too small: BPE stopped at {tokenizer.get_vocab_size()} < {vocab_size} tokens")
    if added_tokens is None:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    else:
        for content, special in added_tokens:       # one at a time: ids follow the given order
            tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tokenizer


def special_token_ids(tokenizer) -> dict:
    """The ids `build_config` and generation_config.json need, read from `tokenizer`."""
    tid = tokenizer.token_to_id
    return {
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(ids: dict):
    """Qwen2-VL-Instruct's generation_config.json with this tokenizer's ids.

    Note do_sample=True with top_k=1 is greedy in effect, but
    repetition_penalty=1.05 still reshapes logits: pass do_sample=False,
    repetition_penalty=1.0 for plain greedy decoding.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        pad_token_id=ids["pad_token_id"],
        do_sample=True,
        eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],  # <|im_end|>, <|endoftext|>
        repetition_penalty=1.05,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
    )


def write_weights(out_dir: Path, config, ids: dict, seed: int, dtype: str, generation=None) -> None:
    """config.json, generation_config.json (`generation`, else Qwen2-VL's) and model.safetensors with random weights.

    The model is built directly in `dtype` (a 2B in bfloat16 needs ~4.4 GB,
    not 8.8 GB of float32 first). transformers' init draws every Linear,
    Conv3d and Embedding from N(0, initializer_range) and zeroes biases.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    model = cls._from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = generation or generation_config(ids)
    model.save_pretrained(out_dir)
