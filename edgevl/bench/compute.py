"""The compute side of the roofline: arithmetic per stage, and the GEMM rate measured here.

Decode reads every weight once per token, so its floor is bytes / memory bandwidth
(stats.floor_ms). The vision encoder and prefill instead multiply hundreds of rows by each
weight: they are bound by arithmetic, and their floor is FLOPs / the rate this machine's
matrix multiply reaches. This module gives both halves:

* `vision_flops(config, grid)`, `decoder_flops(config, tokens, past)`: multiply-adds x 2
  of every matrix product the model runs (patch embedding, QKV/out projections, MLPs — gated
  in Qwen2.5-VL —, attention scores and values over the rows each block attends to: a whole
  temporal patch, or a window in Qwen2.5-VL's windowed blocks, merger, lm_head on the last
  position only). Element-wise work (norms, activations, rotary) is left out: well under 1 %
  here. Checked against torch.utils.flop_counter on the transformers models.
* `measure_gemm(threads)`: GFLOP/s of onnxruntime's own fp32 MatMul and int8
  DynamicQuantizeMatMul (per-channel int8 weights, what `edgevl quantize --recipe int8`
  emits) on a ViT-MLP-sized product, best of a few runs. A measured rate, not the
  hardware peak: the same kernels the graphs use, on the same threads.

`config` is the artifact's ModelConfig (the manifest's `config`).
"""

from __future__ import annotations

import time

import numpy as np

from edgevl.artifact.model_config import ModelConfig
from edgevl.runtime.inputs.windows import window_layout

GEMM_SHAPE = (1024, 1280, 5120)    # M, K, N: a 448x448 image's patches through a 2B ViT's MLP


def _attention_rows(config: ModelConfig, h: int, w: int) -> int:
    """Sum over the vision blocks of (rows attended together)^2, for one temporal patch of h x w patches."""
    full = (h * w) ** 2
    if not config.vision_window_size:
        return config.vision_depth * full
    layout = window_layout(h, w, config.spatial_merge_size, config.vision_window_size, config.patch_size)
    windowed = int((layout.mask.sum(1) ** 2).sum())
    full_blocks = len(config.vision_fullatt_blocks)
    return full_blocks * full + (config.vision_depth - full_blocks) * windowed


def vision_flops(config: ModelConfig, grid: tuple[int, int, int]) -> int:
    """FLOPs of the vision encoder + merger for one image or video of grid (t, h, w) patches.

    Attention runs within each temporal patch (h*w rows), as the exported graph and
    transformers' per-frame cu_seqlens do (and within windows, in Qwen2.5-VL's windowed blocks).
    """
    t, h, w = grid
    n, d = t * h * w, config.vision_embed_dim
    gated = config.model_type == "qwen2_5_vl"
    mlp = config.vision_intermediate_size or 4 * d
    patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    per_block = 2 * n * d * (4 * d + (3 if gated else 2) * mlp)            # qkv + proj, MLP
    attention = t * 4 * _attention_rows(config, h, w) * d                   # QK^T and AV
    merged, wide = n // config.spatial_merge_size ** 2, d * config.spatial_merge_size ** 2
    # one merger, and one more per DeepStack level (Qwen3-VL), each LayerNorm -> fc1 [wide, wide] -> fc2 [wide, hidden]
    mergers = (1 + len(config.vision_deepstack_indexes)) * 2 * merged * wide * (wide + config.hidden_size)
    return 2 * n * patch * d + config.vision_depth * per_block + attention + mergers


def decoder_flops(config: ModelConfig, tokens: int, past: int = 0) -> int | None:
    """FLOPs of the decoder for `tokens` new positions after `past` cached ones (prefill: past=0;
    one decode step: tokens=1), logits for the last position only. Attention counts every
    (query, key) pair the graph computes: tokens x (past + tokens), masked or not. None for a
    manifest that does not record the MLP width."""
    if config.intermediate_size is None:
        return None
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)         # q, o; k, v
    mlp = 3 * hidden * config.intermediate_size                                   # gate, up, down
    if config.num_experts:          # MoE: the router, and the chosen experts' gate, up and down per token
        mlp = hidden * config.num_experts + config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    attention = 4 * tokens * (past + tokens) * heads * head_dim             # QK^T and AV
    lm_head = 2 * hidden * config.vocab_size
    return layers * (2 * tokens * (projections + mlp) + attention) + lm_head


def image_grid(image, s) -> tuple[int, int, int]:
    """The (1, h, w) patch grid edgevl's preprocessing (ImageProcessorSettings `s`) gives an image file,
    without decoding its pixels."""
    from PIL import Image

    from edgevl.runtime.inputs.image_processing import smart_resize
    with Image.open(image) as im:
        width, height = im.size
    if s.do_resize:
        height, width = smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels)
    return 1, height // s.patch_size, width // s.patch_size


def throughput(flops: float | None, ms: float | None) -> float | None:
    """FLOP/s from a FLOP count and milliseconds; None when either is missing."""
    if not flops or not ms or ms <= 0:
        return None
    return flops / (ms / 1e3)


# ----------------------------------------------------------------------------- GEMM rate here
def _gemm_models(m: int, k: int, n: int, rng):
    from onnx import TensorProto, helper, numpy_helper
    weight = rng.standard_normal((k, n), dtype=np.float32)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    fp32 = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm_fp32", [a], [y],
                             [numpy_helper.from_array(weight, "w")])
    scale = np.abs(weight).max(axis=0) / 63                                 # per-column, 7-bit like reduce_range
    quantized = np.clip(np.round(weight / scale), -63, 63).astype(np.int8)
    int8 = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["a", "w", "s"], ["y"], domain="com.microsoft")],
        "gemm_int8", [a], [y],
        [numpy_helper.from_array(quantized, "w"), numpy_helper.from_array(scale.astype(np.float32), "s")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return {name: helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()
            for name, graph in (("fp32", fp32), ("int8", int8))}


def measure_gemm(threads: int = 0, shape: tuple[int, int, int] = GEMM_SHAPE, repeats: int = 5) -> dict:
    """Best-of-`repeats` GFLOP/s of onnxruntime's fp32 and int8 matrix multiply on the CPU.

    Returns {"fp32_flops_per_s", "int8_flops_per_s", "shape", "threads", "method"}; the rates are
    None (with "skipped") when onnx or onnxruntime is missing.
    """
    try:
        import onnxruntime as ort

        from edgevl.runtime.backends.ort_session import session_options
        models = _gemm_models(*shape, np.random.default_rng(0))
    except ImportError as e:
        return {"fp32_flops_per_s": None, "int8_flops_per_s": None, "shape": list(shape),
                "skipped": f"{e.name} is not installed"}
    m, k, n = shape
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    out = {"shape": list(shape), "threads": threads or None, "repeats": repeats}
    for name, model in models.items():
        session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
        session.run(None, {"a": a})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, {"a": a})
            times.append(time.perf_counter() - t0)
        out[f"{name}_flops_per_s"] = 2 * m * k * n / min(times)
    out["method"] = (f"onnxruntime CPU MatMul (fp32) and DynamicQuantizeMatMul (int8, per-channel weights) of "
                     f"[{m}x{k}] x [{k}x{n}], weights prepacked, best of {repeats}. A measured rate, not the "
                     f"hardware peak.")
    return out
