"""transformers as the reference: inputs built the way Qwen2VLProcessor builds them, and generate().

The processor itself needs torchvision, so its steps are spelled out: tokenizer.apply_chat_template,
the PIL image processor, image pads expanded to t*h*w/merge^2, and mm_token_type_ids for M-RoPE.
"""

from __future__ import annotations

import torch

NEW_TOKENS = 24


def make_hf_inputs(tiny_model_dir):
    """A function (prompt, image_paths) -> (input_ids [1, S], extra generate() kwargs)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_model_dir)

    def build(prompt: str, image_paths=()):
        from PIL import Image
        content = [{"type": "image"} for _ in image_paths] + [{"type": "text", "text": prompt}]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        extra = {}
        if image_paths:
            images = [Image.open(p) for p in image_paths]
            px = processor(images, return_tensors="pt")
            for grid in px["image_grid_thw"]:
                n = int(grid.prod()) // processor.merge_size ** 2
                text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
            extra = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        return ids, extra

    return build


def hf_generate(hf_model, ids, extra, attention_mask=None, **kwargs):
    image_token = hf_model.config.image_token_id
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_token).int(),
                                max_new_tokens=NEW_TOKENS, do_sample=False, **extra, **kwargs)
    return out[:, ids.shape[1]:]


def strip_after_eos(tokens, eos_ids):
    """transformers pads finished rows; edgevl stops at EOS (included)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out
