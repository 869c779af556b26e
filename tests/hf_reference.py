"""transformers as the reference: inputs built the way Qwen2VLProcessor builds them, and generate().

The processor itself needs torchvision; edgevl.bench.reference.processor_inputs spells out its steps.
generate() also needs mm_token_type_ids for M-RoPE.
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

    from edgevl.bench.reference import processor_inputs
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_model_dir)

    def build(prompt: str, image_paths=()):
        inputs = processor_inputs(tokenizer, processor, prompt, list(image_paths))
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")} if image_paths else {}
        return inputs["input_ids"], extra

    return build


def hf_generate(hf_model, ids, extra, attention_mask=None, max_new_tokens=NEW_TOKENS, **kwargs):
    image_token = hf_model.config.image_token_id
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_token).int(),
                                max_new_tokens=max_new_tokens, do_sample=False, **extra, **kwargs)
    return out[:, ids.shape[1]:]


def strip_after_eos(tokens, eos_ids):
    """transformers pads finished rows; edgevl stops at EOS (included)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out
