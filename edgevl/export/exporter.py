"""`edgevl export`: a Hugging Face Qwen2-VL checkpoint -> an artifact folder the runtime runs.

Steps: load the checkpoint, export `VisionGraph` and `DecoderGraph` with
torch.onnx (dynamo), attach the `edgevl::MRoPE` function, check both graphs,
write the embedding table and the tokenizer / chat template / processor files,
and finish with `manifest.json`. Everything is written to a temporary sibling
folder and renamed into place at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from edgevl.artifact import names
from edgevl.artifact.folder import check_output, read_json_object, staged_folder, write_manifest
from edgevl.artifact.manifest import EmbeddingSpec, Manifest, SourceModel
from edgevl.artifact.model_config import MODEL_TYPES, QWEN3_MODEL_TYPES, ModelConfig
from edgevl.artifact.onnx_files import describe_graph, tied_dense_table, write_npy
from edgevl.errors import EdgevlError
from edgevl.export.modules import KV_CACHE
from edgevl.export.ops import FUSED_STANDARD_OPSET, VARIANT_OPSET, in_place_problem
from edgevl.export.trace import export_decoder, export_vision
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.backends.probe import package_versions
from edgevl.runtime.inputs.video import video_settings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MAX_OPSET = 24
# standard graphs default to the opset with fused Attention / RotaryEmbedding / RMSNormalization (TensorRT >= 10.15);
# --opset 18..22 gives the same math in primitive ops for older TensorRT (JetPack 6: 10.3)
DEFAULT_OPSET = {"ort": 18, "standard": FUSED_STANDARD_OPSET}
EXPORT_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy")
SUPPORTED_MODEL_TYPES = MODEL_TYPES
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "preprocessor_config.json", "video_preprocessor_config.json", "config.json")


# ----------------------------------------------------------------------------- loading
def resolve_model_dir(model: str) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded (or taken from the cache)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise EdgevlError(f"{model} is a file; MODEL must be a Hugging Face model folder or a hub id.")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, bad id: all one sentence for the user
        raise EdgevlError(f"{model} is not a local folder and could not be fetched from the hub "
                          f"({type(e).__name__}).") from None


def check_in_place_heads(model_dir: Path) -> None:
    """EdgevlError (the reason and the variant that works) when the decoder's head size is one the ort variant's
    GroupQueryAttention does not take: refused here, not at every run inside onnxruntime."""
    from transformers import AutoConfig
    try:
        text = AutoConfig.from_pretrained(model_dir).get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return                                      # a config transformers cannot read: load_model says why
    problem = in_place_problem(head_dim)
    if problem:
        raise EdgevlError(f"{model_dir}: {problem}.")


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise EdgevlError(f"{model_dir} has no config.json; it is not a Hugging Face model folder.")
    config = read_json_object(path, "model config")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise EdgevlError(f"{model_dir} holds a '{config.get('model_type')}' model; edgevl exports "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) models.")
    if not any(next(model_dir.glob(p), None) for p in WEIGHT_PATTERNS):
        raise EdgevlError(f"{model_dir} has a config.json but no weights (*.safetensors or pytorch_model*.bin).")
    return config


def load_model(model_dir: Path, dtype: torch.dtype, model_type: str):
    import transformers
    cls = getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                 "qwen3_vl": "Qwen3VLForConditionalGeneration",
                                 "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}[model_type])
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:   # bad config values, broken shards
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise EdgevlError(f"transformers could not load the model in {model_dir} ({type(e).__name__}"
                          f"{': ' + first if first else ''}).") from None
    return model.eval()


# ----------------------------------------------------------------------------- side files
def copy_side_files(model_dir: Path, out: Path) -> None:
    if not (model_dir / "tokenizer.json").exists():
        raise EdgevlError(f"{model_dir} has no tokenizer.json; the runtime needs the fast tokenizer file.")
    for name in COPIED_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out / name)
    template = find_chat_template(model_dir)
    if template is None:
        raise EdgevlError(f"{model_dir} has no chat template (chat_template.jinja, chat_template.json or "
                          f"tokenizer_config.json's chat_template).")
    (out / "chat_template.jinja").write_text(template)


def find_chat_template(model_dir: Path) -> str | None:
    if (model_dir / "chat_template.jinja").exists():
        return (model_dir / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            template = read_json_object(path, "tokenizer / template config").get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


def model_facts(config, generation: dict) -> ModelConfig:
    """The config values the runtime needs, flattened (no hard-coded sizes anywhere downstream)."""
    text, vision = config.text_config, config.vision_config
    eos = generation.get("eos_token_id", getattr(text, "eos_token_id", None))
    if eos is None:
        raise EdgevlError("the checkpoint names no eos_token_id (generation_config.json or config.json).")
    return ModelConfig(**{
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rope_theta": text.rope_parameters["rope_theta"],
        "mrope_section": tuple(text.rope_parameters["mrope_section"]),
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "eos_token_id": tuple(eos) if isinstance(eos, list) else (eos,),
        "pad_token_id": generation.get("pad_token_id", text.pad_token_id),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "in_channels": vision.in_channels,
        "vision_embed_dim": getattr(vision, "embed_dim", None) or vision.hidden_size,
        "vision_depth": vision.depth,
        "intermediate_size": text.intermediate_size,
        "vision_intermediate_size": (int(vision.embed_dim * vision.mlp_ratio) if config.model_type == "qwen2_vl"
                                     else vision.intermediate_size),
        "model_type": config.model_type,
        # Qwen2.5-VL: window attention (pixels) outside the full-attention blocks, and video time ids spaced by
        # tokens_per_second x seconds per temporal patch; None for Qwen2-VL.
        "vision_window_size": getattr(vision, "window_size", None),
        "vision_fullatt_blocks": tuple(getattr(vision, "fullatt_block_indexes", None) or ()),
        "tokens_per_second": getattr(vision, "tokens_per_second", None),
        # Qwen3-VL: interleaved M-RoPE, the learned position table, DeepStack levels; MoE counts for qwen3_vl_moe.
        "mrope_interleaved": config.model_type in QWEN3_MODEL_TYPES,
        "num_position_embeddings": getattr(vision, "num_position_embeddings", None),
        "vision_deepstack_indexes": tuple(getattr(vision, "deepstack_visual_indexes", None) or ()),
        "num_experts": getattr(text, "num_experts", None),
        "num_experts_per_tok": getattr(text, "num_experts_per_tok", None),
        "moe_intermediate_size": getattr(text, "moe_intermediate_size", None),
    })


# ----------------------------------------------------------------------------- entry point
def export_model(model: str, out: str | Path, dtype: str = "fp32", opset: int | None = None, force: bool = False,
                 log=print, variant: str = "ort") -> Path:
    """Export `model` (folder or hub id) to the artifact folder `out`; returns its path.

    variant: "ort" (onnxruntime's fused contrib ops; ort-cpu, ort-cuda) or "standard" (ONNX-standard ops,
    opset 23+; trt, ort-trt and other runtimes). opset: the default domain's (None: the variant's lowest)."""
    if dtype not in DTYPES:
        raise EdgevlError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if variant not in VARIANT_OPSET:
        raise EdgevlError(f"--variant must be one of {', '.join(VARIANT_OPSET)}, not {variant!r}.")
    lowest = VARIANT_OPSET[variant]
    opset = DEFAULT_OPSET[variant] if opset is None else opset
    if not lowest <= opset <= MAX_OPSET:
        raise EdgevlError(f"--opset must be between {lowest} and {MAX_OPSET} for the {variant} variant, not {opset}.")
    model_dir = resolve_model_dir(model)
    inputs = [("the checkpoint", model_dir)]
    check_output(Path(out), force, inputs)          # before any work: never replace or write into the checkpoint
    model_type = read_config(model_dir)["model_type"]
    if variant == "ort":
        check_in_place_heads(model_dir)             # before the weights load
    preprocessor = model_dir / "preprocessor_config.json"
    if not preprocessor.exists():
        raise EdgevlError(f"{model_dir} has no preprocessor_config.json (the image-processor settings).")
    preprocessor_dict = read_json_object(preprocessor, "image-processor settings")
    settings = ImageProcessorSettings.from_dict(preprocessor_dict)
    # transformers' video processor reads video_preprocessor_config.json, else preprocessor_config.json.
    video_file = model_dir / "video_preprocessor_config.json"
    frames = video_settings(settings, read_json_object(video_file, "video-processor settings") if video_file.exists()
                            else preprocessor_dict)
    generation = read_json_object(model_dir / "generation_config.json", "generation config") \
        if (model_dir / "generation_config.json").exists() else {}

    torch_dtype = DTYPES[dtype]
    log(f"loading {model} ({dtype})")
    hf_model = load_model(model_dir, torch_dtype, model_type)
    with staged_folder(Path(out), force=force, inputs=inputs) as tmp, torch.no_grad():
        copy_side_files(model_dir, tmp)
        log(f"exporting vision encoder ({variant} ops) -> vision.onnx")
        export_vision(hf_model, tmp / "vision.onnx", torch_dtype, opset, variant)
        kv_cache = KV_CACHE[variant]
        log(f"exporting decoder ({variant} ops, {kv_cache.replace('_', '-')} KV cache) -> decoder.onnx")
        export_decoder(hf_model, tmp / "decoder.onnx", torch_dtype, opset, variant, kv_cache)
        table = hf_model.model.language_model.embed_tokens.weight.detach().numpy()
        embeddings = hf_model.config.tie_word_embeddings and tied_dense_table(tmp, "decoder.onnx", table)
        if embeddings:
            log("embedding table: the decoder's own lm_head weight (tied embeddings, stored once)")
        else:
            log("writing embedding table -> embed_tokens.npy")
            weight = write_npy(tmp, "embed_tokens.npy", table)
            embeddings = EmbeddingSpec("dense", weight, vocab=table.shape[0], hidden=table.shape[1])
        log("hashing files -> manifest.json")
        write_manifest(tmp, Manifest(
            source=SourceModel(str(model), hf_model.config.model_type), dtype=dtype, opset=opset,
            config=model_facts(hf_model.config, generation), image_processor=settings, video_processor=frames,
            graphs={names.VISION: describe_graph(tmp / "vision.onnx", names.VISION, dtype, variant),
                    names.DECODER: describe_graph(tmp / "decoder.onnx", names.DECODER, dtype, variant, kv_cache)},
            embeddings=embeddings,
            versions=package_versions(EXPORT_PACKAGES)))
    return Path(out)
