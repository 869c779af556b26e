"""torch modules -> ONNX graphs: torch.onnx.export (dynamo) with the variant's op translations, readable dims,
the edgevl.MRoPE function attached, saved and checked. Qwen2-VL and Qwen2.5-VL take modules.py's graphs,
Qwen3-VL (dense and MoE) qwen3_vl.py's, which have more inputs and outputs (docs/graphs.md)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from edgevl.artifact import names
from edgevl.artifact.onnx_files import save_graph
from edgevl.export import qwen3_vl
from edgevl.export.modules import DECODERS, VISION, WindowVisionGraph
from edgevl.export.moe import moe_translations
from edgevl.export.mrope import attach_mrope_function, mrope_translation
from edgevl.export.ops import flavor, translations
from edgevl.runtime.inputs.pos_embed import pos_embed_taps
from edgevl.runtime.inputs.windows import window_layout

VISION_GRAPHS = {**VISION, **{t: qwen3_vl.Qwen3VisionGraph for t in qwen3_vl.MODEL_TYPES}}


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


def _table(variant: str) -> dict:
    return {**translations(variant), **moe_translations(variant), torch.ops.edgevl.mrope.default: mrope_translation}


def export_vision(model, path: Path, dtype: torch.dtype, opset: int, variant: str) -> None:
    vcfg = model.config.vision_config
    graph = VISION_GRAPHS[model.config.model_type](model.model.visual, flavor(variant, opset)).eval()
    h, w = 12, 20  # any grid works; the size is symbolic in the graph (windows: partial ones included)
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    pixels = torch.randn(h * w, patch_dim, dtype=dtype)
    rotary = torch.zeros(h * w, 2, dtype=torch.long)
    n = torch.export.Dim(names.NUM_PATCHES)
    args, inputs, dynamic = (pixels, rotary), [names.PIXEL_VALUES, names.ROTARY_POS_IDS], [{0: n}, {0: n}]
    if isinstance(graph, WindowVisionGraph):
        layout = window_layout(h, w, vcfg.spatial_merge_size, vcfg.window_size, vcfg.patch_size)
        args += tuple(torch.from_numpy(a) for a in (layout.gather, layout.mask, layout.scatter))
        inputs += [names.WINDOW_GATHER, names.WINDOW_MASK, names.WINDOW_SCATTER]
        windows = torch.export.Dim(names.NUM_WINDOWS)
        dynamic += [{0: windows}, {0: windows}, {0: n}]
    outputs = [names.IMAGE_EMBEDS]
    if isinstance(graph, qwen3_vl.Qwen3VisionGraph):
        taps = pos_embed_taps((1, h, w), vcfg.num_position_embeddings, vcfg.spatial_merge_size)
        args += tuple(torch.from_numpy(a) for a in taps)
        inputs += [names.POS_EMBED_IDS, names.POS_EMBED_WEIGHTS]
        dynamic += [{0: n}, {0: n}]
        outputs.append(names.DEEPSTACK_EMBEDS)
    onnx_model = _quiet_export(graph, args, input_names=inputs, output_names=outputs,
                               dynamic_shapes=tuple(dynamic), opset_version=opset,
                               custom_translation_table=_table(variant))
    _import_domains(onnx_model)
    save_graph(onnx_model, path)


def decoder_io_names(num_layers: int, kv_cache: str, extra: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """The decoder's inputs (extra ones, e.g. Qwen3-VL's deepstack_embeds, after the lengths) and outputs."""
    kv = names.kv_names(num_layers)
    lengths = [names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH] if kv_cache == names.IN_PLACE else [names.ATTENTION_MASK]
    inputs = [names.INPUTS_EMBEDS, names.POSITION_IDS, *lengths, *extra] + [past for past, _ in kv]
    outputs = [names.LOGITS, names.NEXT_TOKEN] + [present for _, present in kv]
    return inputs, outputs


def export_decoder(model, path: Path, dtype: torch.dtype, opset: int, variant: str, kv_cache: str) -> None:
    decoders = qwen3_vl.DECODERS if model.config.model_type in qwen3_vl.MODEL_TYPES else DECODERS
    graph = decoders[variant](model, flavor(variant, opset)).eval()
    layers = len(graph.layers)
    bsz, seq, past = 2, 5, 3
    hidden = model.config.text_config.hidden_size
    embeds = torch.randn(bsz, seq, hidden, dtype=dtype)
    positions = torch.arange(past, past + seq).view(1, 1, seq).expand(3, bsz, seq).contiguous()
    b, s = torch.export.Dim(names.BATCH), torch.export.Dim(names.SEQUENCE)
    if kv_cache == names.IN_PLACE:
        capacity = 16                                          # buffer positions; symbolic in the graph
        lengths = (torch.full((bsz,), past + seq - 1, dtype=torch.int32), torch.tensor(past + seq, dtype=torch.int32))
        kv = [torch.zeros(bsz, graph.num_kv_heads, capacity, graph.head_dim, dtype=dtype) for _ in range(2 * layers)]
        m = torch.export.Dim(names.MAX_CONTEXT)
        dynamic = ({0: b, 1: s}, {1: b, 2: s}, {0: b}, None)
        kv_dynamic = tuple({0: b, 2: m} for _ in kv)
    else:
        lengths = (torch.ones(bsz, past + seq, dtype=torch.long),)
        kv = [torch.randn(bsz, graph.num_kv_heads, past, graph.head_dim, dtype=dtype) for _ in range(2 * layers)]
        p = torch.export.Dim(names.PAST_SEQUENCE, min=0)
        dynamic = ({0: b, 1: s}, {1: b, 2: s}, {0: b, 1: torch.export.Dim.AUTO})
        kv_dynamic = tuple({0: b, 2: p} for _ in kv)
    extra = graph.extra_inputs(bsz, seq, dtype, b, s) if hasattr(graph, "extra_inputs") else []
    inputs, outputs = decoder_io_names(layers, kv_cache, tuple(name for name, _, _ in extra))
    onnx_model = _quiet_export(graph, (embeds, positions, *lengths, *(t for _, t, _ in extra), *kv),
                               input_names=inputs, output_names=outputs,
                               dynamic_shapes=(*dynamic, *(d for _, _, d in extra), kv_dynamic), opset_version=opset,
                               custom_translation_table=_table(variant))
    attach_mrope_function(onnx_model)
    _import_domains(onnx_model)
    if kv_cache == names.CONCAT:
        total = str(onnx_model.graph.inputs[2].shape[1])
        _rename_dims(onnx_model, {total: names.TOTAL_SEQUENCE, f"{names.SEQUENCE} + {names.PAST_SEQUENCE}":
                                  names.TOTAL_SEQUENCE, f"{names.PAST_SEQUENCE} + {names.SEQUENCE}":
                                  names.TOTAL_SEQUENCE})
    save_graph(onnx_model, path)


def _import_domains(model: ir.Model) -> None:
    """Every op domain a graph uses is imported (the exporter only imports those it knows)."""
    for node in model.graph:
        if node.domain and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
