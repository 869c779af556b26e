"""The transformers side of `edgevl bench --reference hf`: eager PyTorch, same dtype, sdpa attention.

`TransformersEngine` implements measure.Engine on `Qwen2VLForConditionalGeneration`
(`Qwen2_5_VLForConditionalGeneration` for a Qwen2.5-VL artifact) loaded from the source
model recorded in the artifact's manifest. Its stages are the
pieces `generate()` runs, called one by one so each can be timed:

    prepare   tokenizer.apply_chat_template + Qwen2VLImageProcessorPil + image-pad expansion + tokenizer
              (what Qwen2VLProcessor does; the processor class itself needs torchvision)
    encode    model.model.get_image_features(pixel_values, image_grid_thw)   (the vision tower + merger)
    prefill   get_rope_index (3-D M-RoPE) + the first forward of the whole model with a fresh DynamicCache,
              the image features passed in as mm_encoder_outputs (so the vision tower is not run twice),
              logits_to_keep=1 (as generate() does) + argmax
    decode    one forward of one token with the cache, position ids = cache length + rope delta + argmax

This is a manual loop, not generate(): generate() cannot be split into these stages
without hooks. Checked against generate() with a timestamping logits processor on
qwen2-vl-2b-l4 (2 cores): the same decode ms/token (median 119-124 vs 119, min 107.6
both), so generate()'s per-step extras (logits processors, stopping checks) are noise.
Everything runs under torch.inference_mode(). torch is imported lazily, so the rest of
edgevl.bench works without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgevl.errors import EdgevlError
from edgevl.extras import requires

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def reference_dtype(manifest) -> str:
    """The dtype to run transformers in: the artifact's export dtype (fp32 for quantized artifacts)."""
    return manifest.dtype if manifest.dtype in TORCH_DTYPES else "fp32"


def resolve_source(manifest, override: str | None = None) -> Path:
    """The local folder of the source model recorded in the Manifest (or `override`)."""
    name = override or manifest.source.name_or_path
    path = Path(name)
    if path.is_dir() and (path / "config.json").exists():
        return path
    try:  # a hub id already in the local cache; never downloads
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise EdgevlError(f"the source model {name!r} recorded in the manifest is not a local model folder "
                          f"or a cached hub model; pass --reference-model PATH.") from None


def processor_inputs(tokenizer, image_processor, text: str, images=()) -> dict:
    """What Qwen2VLProcessor returns for one user message (images first, then text), done by hand
    because the processor class needs torchvision: chat template, PIL image processor, and each
    image's pad expanded to t*h*w / merge^2 pads. -> {"input_ids" [1, S], "pixel_values", "image_grid_thw"}
    (the last two None without images)."""
    from PIL import Image
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    out = {"pixel_values": None, "image_grid_thw": None}
    if images:
        opened = [Image.open(img) if isinstance(img, (str, Path)) else img for img in images]
        px = image_processor(opened, return_tensors="pt")
        for grid in px["image_grid_thw"]:          # a placeholder so the next replace finds the next image
            pads = int(grid.prod()) // image_processor.merge_size ** 2
            chat = chat.replace("<|image_pad|>", "<|placeholder|>" * pads, 1)
        chat = chat.replace("<|placeholder|>", "<|image_pad|>")
        out = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
    return {"input_ids": tokenizer(chat, return_tensors="pt")["input_ids"], **out}


def processor_chat_template(model_dir: Path) -> str | None:
    """The chat template a checkpoint keeps beside its processor (chat_template.json / .jinja), or None."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").is_file():
        return json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
    return None


def model_class(model_type: str):
    """transformers' class for a model_type the exporter accepts."""
    import transformers
    classes = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
    if model_type not in classes:
        raise EdgevlError(f"the reference model is a '{model_type}' model; edgevl compares {', '.join(classes)}.")
    return getattr(transformers, classes[model_type])


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: Path, dtype: str = "fp32", threads: int = 0):
        with requires("export", "--reference hf"):
            import torch
            from transformers import AutoConfig, AutoTokenizer
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil,
            )
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # "Loading weights" bars would tear through the benchmark's own bar
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = model_class(AutoConfig.from_pretrained(model_dir).model_type).from_pretrained(
            model_dir, dtype=getattr(torch, TORCH_DTYPES[dtype]), attn_implementation="sdpa").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.chat_template is None:    # Qwen3-VL keeps it beside the processor, not the tokenizer
            self.tokenizer.chat_template = processor_chat_template(Path(model_dir))
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        self.load_s = time.perf_counter() - t0
        self.dtype = dtype
        self.threads = torch.get_num_threads()
        self.image_token_id = self.model.config.image_token_id
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_shape = (text.num_key_value_heads, head_dim)
        self.num_layers = text.num_hidden_layers

    def prepare(self, text: str, image: Path | None):
        inputs = processor_inputs(self.tokenizer, self.processor, text, [image] if image is not None else [])
        return {"ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "grid": inputs["image_grid_thw"]}

    def prompt_ids(self, prepared) -> list[int]:
        return prepared["ids"][0].tolist()

    def encode(self, prepared):
        with self.torch.inference_mode():
            return self.model.model.get_image_features(prepared["pixel_values"], prepared["grid"], return_dict=True)

    def prefill(self, prepared, vision):
        from transformers import DynamicCache
        torch = self.torch
        with torch.inference_mode():
            ids = prepared["ids"]
            mask = torch.ones_like(ids)
            types = (ids == self.image_token_id).int()
            positions, deltas = self.model.model.get_rope_index(ids, types, image_grid_thw=prepared["grid"],
                                                                attention_mask=mask)
            cache = DynamicCache(config=self.model.config)
            extra = {"mm_encoder_outputs": {"image": vision}, "image_grid_thw": prepared["grid"],
                     "mm_token_type_ids": types} if vision is not None else {}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1, **extra)
            token = int(out.logits[0, -1].argmax())
        return {"cache": out.cache, "mask": mask, "deltas": deltas}, token

    def decode(self, state, token: int) -> int:
        torch = self.torch
        with torch.inference_mode():
            cache = state["cache"]
            state["mask"] = torch.ones((1, state["mask"].shape[1] + 1), dtype=torch.long)
            positions = (cache.get_seq_length() + state["deltas"]).view(1, 1, 1).expand(3, 1, 1)
            out = self.model(input_ids=torch.tensor([[token]]), attention_mask=state["mask"], position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            state["cache"] = out.cache
            return int(out.logits[0, -1].argmax())

    def synthetic_state(self, context: int):
        from transformers import DynamicCache
        torch = self.torch
        gen = torch.Generator().manual_seed(context)
        heads, dim = self.kv_shape
        dtype = getattr(torch, TORCH_DTYPES[self.dtype])
        layers = [tuple(torch.randn(1, heads, context - 1, dim, generator=gen).to(dtype) for _ in range(2))
                  for _ in range(self.num_layers)]
        cache = DynamicCache(layers, config=self.model.config)
        return {"cache": cache, "mask": torch.ones((1, context - 1), dtype=torch.long),
                "deltas": torch.zeros((1, 1), dtype=torch.long)}

    def close(self) -> None:
        self.model = None
