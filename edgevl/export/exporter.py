"""`edgevl export`: a Hugging Face Qwen2-VL checkpoint -> an artifact folder the runtime runs.

Steps: load the checkpoint, export `VisionGraph` and `DecoderGraph` with
torch.onnx (dynamo), attach the `edgevl::MRoPE` function, check both graphs,
write the embedding table and the tokenizer / chat template / processor files,
and finish with `manifest.json`. Everything is written to a temporary sibling
folder and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from edgevl.artifact import names
from edgevl.artifact.folder import staged_folder, write_manifest
from edgevl.artifact.manifest import EmbeddingSpec, Manifest, ModelConfig, SourceModel
from edgevl.artifact.onnx_files import describe_graph, save_graph
from edgevl.errors import EdgevlError
from edgevl.export.modules import DecoderGraph, VisionGraph
from edgevl.export.mrope import attach_mrope_function, mrope_translation
from edgevl.runtime.image_processing import ImageProcessorSettings
from edgevl.runtime.probe import package_versions
from edgevl.runtime.video import video_settings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXPORT_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy")
SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
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


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise EdgevlError(f"{model_dir} has no config.json; it is not a Hugging Face model folder.")
    config = json.loads(path.read_text())
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise EdgevlError(f"{model_dir} holds a '{config.get('model_type')}' model; edgevl exports "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2-VL) models.")
    return config


def load_model(model_dir: Path, dtype: torch.dtype):
    from transformers import Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


# ----------------------------------------------------------------------------- graphs
def _quiet_export(module, args, **kwargs) -> ir.Model:
    """torch.onnx.export (dynamo) with its progress chatter silenced; returns the IR model."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, verbose=False, **kwargs)
    return program.model


def _rename_dims(model: ir.Model, renames: dict[str, str]) -> None:
    """Give exporter-generated dim names (s53, 'seq + past') readable ones."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [renames.get(str(d), d) if not isinstance(d, int) else d for d in value.shape]
        value.shape = ir.Shape(dims)


def export_vision(model, path: Path, dtype: torch.dtype, opset: int) -> None:
    vcfg = model.config.vision_config
    graph = VisionGraph(model.model.visual).eval()
    t, h, w = 1, 8, 12  # any grid works; the size is symbolic in the graph
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    pixels = torch.randn(t * h * w, patch_dim, dtype=dtype)
    rotary = torch.zeros(t * h * w, 2, dtype=torch.long)
    n = torch.export.Dim(names.NUM_PATCHES)
    onnx_model = _quiet_export(graph, (pixels, rotary), input_names=[names.PIXEL_VALUES, names.ROTARY_POS_IDS],
                               output_names=[names.IMAGE_EMBEDS], dynamic_shapes=({0: n}, {0: n}),
                               opset_version=opset)
    save_graph(onnx_model, path)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = names.kv_names(num_layers)
    inputs = [names.INPUTS_EMBEDS, names.POSITION_IDS, names.ATTENTION_MASK] + [past for past, _ in kv]
    outputs = [names.LOGITS] + [present for _, present in kv]
    return inputs, outputs


def export_decoder(model, path: Path, dtype: torch.dtype, opset: int) -> None:
    graph = DecoderGraph(model).eval()
    layers = len(graph.layers)
    bsz, seq, past = 2, 5, 3
    hidden = model.config.text_config.hidden_size
    embeds = torch.randn(bsz, seq, hidden, dtype=dtype)
    positions = torch.arange(past, past + seq).view(1, 1, seq).expand(3, bsz, seq).contiguous()
    mask = torch.ones(bsz, past + seq, dtype=torch.long)
    kv = [torch.randn(bsz, graph.num_kv_heads, past, graph.head_dim, dtype=dtype) for _ in range(2 * layers)]
    b, s = torch.export.Dim(names.BATCH), torch.export.Dim(names.SEQUENCE)
    p = torch.export.Dim(names.PAST_SEQUENCE, min=0)
    dynamic = ({0: b, 1: s}, {1: b, 2: s}, {0: b, 1: torch.export.Dim.AUTO}, tuple({0: b, 2: p} for _ in kv))
    inputs, outputs = decoder_io_names(layers)
    onnx_model = _quiet_export(graph, (embeds, positions, mask, *kv), input_names=inputs, output_names=outputs,
                               dynamic_shapes=dynamic, opset_version=opset,
                               custom_translation_table={torch.ops.edgevl.mrope.default: mrope_translation})
    attach_mrope_function(onnx_model)
    total = str(onnx_model.graph.inputs[2].shape[1])
    _rename_dims(onnx_model, {total: names.TOTAL_SEQUENCE, f"{names.SEQUENCE} + {names.PAST_SEQUENCE}":
                              names.TOTAL_SEQUENCE, f"{names.PAST_SEQUENCE} + {names.SEQUENCE}": names.TOTAL_SEQUENCE})
    save_graph(onnx_model, path)


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
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


def model_facts(config, generation: dict) -> ModelConfig:
    """The config values the runtime needs, flattened (no hard-coded sizes anywhere downstream)."""
    text, vision = config.text_config, config.vision_config
    eos = generation.get("eos_token_id", text.eos_token_id)
    return ModelConfig(**{
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.hidden_size // text.num_attention_heads,
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
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "in_channels": vision.in_channels,
        "vision_embed_dim": vision.embed_dim,
        "vision_depth": vision.depth,
    })


# ----------------------------------------------------------------------------- entry point
def export_model(model: str, out: str | Path, dtype: str = "fp32", opset: int = 18, force: bool = False,
                 log=print) -> Path:
    """Export `model` (folder or hub id) to the artifact folder `out`; returns its path."""
    if dtype not in DTYPES:
        raise EdgevlError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if not 18 <= opset <= 23:
        raise EdgevlError(f"--opset must be between 18 and 23, not {opset}.")
    model_dir = resolve_model_dir(model)
    read_config(model_dir)
    preprocessor = model_dir / "preprocessor_config.json"
    if not preprocessor.exists():
        raise EdgevlError(f"{model_dir} has no preprocessor_config.json (the image-processor settings).")
    preprocessor_dict = json.loads(preprocessor.read_text())
    settings = ImageProcessorSettings.from_dict(preprocessor_dict)
    # transformers' video processor reads video_preprocessor_config.json, else preprocessor_config.json.
    video_file = model_dir / "video_preprocessor_config.json"
    frames = video_settings(settings, json.loads(video_file.read_text()) if video_file.exists()
                            else preprocessor_dict)
    generation = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").exists() else {}

    torch_dtype = DTYPES[dtype]
    log(f"loading {model} ({dtype})")
    hf_model = load_model(model_dir, torch_dtype)
    with staged_folder(Path(out), force=force) as tmp, torch.no_grad():
        copy_side_files(model_dir, tmp)
        log("exporting vision encoder -> vision.onnx")
        export_vision(hf_model, tmp / "vision.onnx", torch_dtype, opset)
        log("exporting decoder with KV cache -> decoder.onnx")
        export_decoder(hf_model, tmp / "decoder.onnx", torch_dtype, opset)
        log("writing embedding table -> embed_tokens.npy")
        table = hf_model.model.language_model.embed_tokens.weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table)
        log("hashing files -> manifest.json")
        write_manifest(tmp, Manifest(
            source=SourceModel(str(model), hf_model.config.model_type), dtype=dtype, opset=opset,
            config=model_facts(hf_model.config, generation), image_processor=settings, video_processor=frames,
            graphs={kind: describe_graph(tmp / f"{kind}.onnx", kind, dtype) for kind in names.GRAPH_KINDS},
            embeddings=EmbeddingSpec("embed_tokens.npy", str(table.dtype), tuple(table.shape)),
            versions=package_versions(EXPORT_PACKAGES)))
    return Path(out)
