"""The quantization passes: thin, pure wrappers over onnxruntime's own tools.

  fp16_convert      onnxruntime.transformers.float16.convert_float_to_float16 with op / node block lists
  tensor_absmax     onnxruntime's MinMax calibrator over every float tensor (fp16 overflow detection)
  int8_static       onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights
  int8_dynamic      onnxruntime.quantization.quantize_dynamic, per-channel int8 weights
  nbits_weights     MatMulNBitsQuantizer: block-wise 4-bit (or 8-bit) MatMul weights (RTN, HQQ, GPTQ)
  awq_prescale      AWQ: per-input-channel scales searched on calibration activations (awq.py), folded
                    into the fp32 weights with a Mul(x, 1/s) in front; nbits_weights' RTN then quantizes

None of them knows about recipes or reports; each takes a graph (path or ModelProto) and
returns or writes the transformed graph. The `edgevl::MRoPE` nodes and their model-local
function pass through untouched: the fp16 converter keeps the nodes fp32 (block list) and
never edits functions; the int8 / 4-bit quantizers only rewrite MatMul / Gemm nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from edgevl.artifact.onnx_files import is_large
from edgevl.calibrate.graph_edit import (
    drop_cast_round_trips,
    initializer_names,
    topological_sort,
)
from edgevl.calibrate.options import CALIBRATION_METHODS, W4_ALGORITHMS
from edgevl.errors import EdgevlError
from edgevl.extras import requires

FP16_MAX = 65504.0
# Calibration only sees some inputs: a tensor whose calibrated |max| exceeds fp16's range / 8
# is kept fp32 (headroom for held-out inputs up to 8x larger than anything calibrated).
FP16_HEADROOM = 8.0
# Always fp32 in the fp16 recipe: normalisations (x^2 overflows fp16 once |x| > 256; the mean
# loses precision), softmax (exp), and the M-RoPE op (angles need fp32 positions).
FP16_KEEP_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Softmax", "MRoPE")


@contextlib.contextmanager
def quiet():
    """onnxruntime's quantizers log INFO/WARNING chatter (pre-processing hints, per-node notices)."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime", "onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod
    if method not in CALIBRATION_METHODS:
        raise EdgevlError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, not {method!r}.")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


# ----------------------------------------------------------------------------- fp16
def norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of every normalisation module, found by the exporter's metadata (the decoder's RMSNorm is
    decomposed into Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul)."""
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}.get("namespace", "")
        classes = [seg.split(":")[-1].strip() for seg in meta.split("/")[1:-1]]
        if any(c.endswith("Norm") for c in classes):            # LayerNorm, Qwen2VLRMSNorm, ...
            names.append(node.name)
    return names


def tensor_absmax(model_path: Path, reader, work: Path) -> dict[str, float]:
    """max |x| of every float tensor of a graph over the calibration feeds (MinMax calibrator, streamed)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with quiet():
        calibrator = create_calibrator(str(model_path), None, augmented_model_path=str(work / "ranges.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       use_external_data_format=is_large(model_path),
                                       extra_options={})
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    # range_value is (min, max), each a scalar array (or per-channel arrays for some tensors)
    return {name: float(max(np.abs(np.asarray(r.range_value[0])).max(), np.abs(np.asarray(r.range_value[1])).max()))
            for name, r in ranges.data.items()}


def overflow_nodes(model: onnx.ModelProto, absmax: dict[str, float], limit: float = FP16_MAX / FP16_HEADROOM
                   ) -> dict[str, str]:
    """{node: reason} for nodes that produce or consume a tensor whose calibrated |max| exceeds `limit`.

    Both ends stay fp32 so the value never passes through fp16 (the Cast round trip between
    them is removed after conversion).
    """
    hot = {name: v for name, v in absmax.items() if v > limit}
    reasons = {}
    for node in model.graph.node:
        for name in [*node.output, *node.input]:
            if name in hot:
                reasons[node.name] = f"{name} reaches |{hot[name]:.3g}| > {limit:.3g}"
                break
    return reasons


def fp16_convert(model: onnx.ModelProto, keep_fp32: set[str], keep_io: list[str]) -> onnx.ModelProto:
    """fp16 weights and activations except FP16_KEEP_OPS, norm modules and `keep_fp32` nodes.

    model: a graph with shapes inferred (graphs.with_shapes). keep_io: graph inputs/outputs that
    stay fp32 (e.g. logits); the rest become fp16, which the runtime follows (it reads the input
    dtypes, so the KV cache is fp16 too).
    """
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    block_nodes = set(norm_nodes(model)) | set(keep_fp32)
    with quiet():
        converted = convert_float_to_float16(model, keep_io_types=list(keep_io), disable_shape_infer=True,
                                             op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_OPS],
                                             node_block_list=sorted(block_nodes))
    drop_cast_round_trips(converted.graph)
    topological_sort(converted.graph)        # the converter appends its Casts at the end
    return converted


# ----------------------------------------------------------------------------- int8
def int8_static(src: Path, dst: Path, reader, method: str, nodes: list[str]) -> None:
    """QDQ int8: per-channel symmetric weights, activations calibrated by `method`, only `nodes` quantized."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with quiet():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"],
                        per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=_ort_method(method),
                        use_external_data_format=is_large(src),
                        extra_options={"WeightSymmetric": True,
                                       "ActivationSymmetric": False, "MatMulConstBOnly": True,
                                       # One feed per collection pass: onnxruntime holds a pass's activations
                                       # before folding them into ranges / histograms, and its histogram
                                       # collector cannot stack feeds of different shapes (image sizes).
                                       "CalibStridedMinMax": 1})


def int8_dynamic(src: Path, dst: Path, nodes: list[str]) -> None:
    """Dynamic int8: per-channel int8 weights; activations quantized per tensor at run time.

    reduce_range (7-bit weights) avoids the int16 saturation of x86 AVX2 u8s8 kernels
    (VPMADDUBSW) that per-channel weights otherwise hit on CPUs without VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=is_large(src),
                         extra_options={"MatMulConstBOnly": True})


# ----------------------------------------------------------------------------- n-bit weights
def nbits_weights(model: onnx.ModelProto | None, nodes: list[str], bits: int, block_size: int, algorithm: str = "rtn",
                  reader=None, check_only: bool = False) -> onnx.ModelProto | None:
    """Block-wise `bits`-bit weights (MatMulNBits, asymmetric, `block_size` rows per scale) for MatMul `nodes`.

    rtn   round-to-nearest (onnxruntime's C++ kernel, fast)
    awq   RTN of weights the caller has already rescaled with awq_prescale (the activation-aware part)
    hqq   half-quadratic optimisation of scales / zero points (needs torch; no calibration data)
    gptq  Hessian-aware rounding from calibration activations (`reader`); quantizes every
          constant-weight MatMul of the graph, so callers pass graphs whose other weights are Gemm.
          Refused where onnxruntime's port reduces to RTN (1.32: gptq_differs_from_rtn() is False)
    check_only: validate `algorithm` (torch present, GPTQ effective) and return None
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if not nodes and not check_only:
        return model
    inits = initializer_names(model) if model is not None else set()
    others = [n.name for n in model.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits and n.name not in set(nodes)] if model else []
    if algorithm in ("rtn", "awq"):
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    elif algorithm == "hqq":
        with requires("export", "--w4-algorithm hqq"):
            import torch  # noqa: F401
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif algorithm == "gptq":
        if not gptq_differs_from_rtn():
            import onnxruntime
            raise EdgevlError(f"--w4-algorithm gptq: onnxruntime {onnxruntime.__version__}'s GPTQ returns exactly the "
                              f"round-to-nearest weights (its error feedback reads the zero triangle of the inverse-"
                              f"Hessian factor), so use rtn (same result, faster) or hqq.")
        if others:
            raise ValueError("gptq quantizes every MatMul weight; convert the others to Gemm or quantize them first")
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
    else:
        raise EdgevlError(f"--w4-algorithm must be one of {', '.join(W4_ALGORITHMS)}, not {algorithm!r}.")
    if check_only:        # the algorithm is usable here; nothing to quantize
        return None
    with quiet(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # GPTQ prints progress
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                         nodes_to_exclude=others, algo_config=config)
        quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    if not any(imp.domain == "com.microsoft" for imp in out.opset_import):   # the GPTQ path forgets it
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    set_accuracy_level(out, 4, bits=8)
    topological_sort(out.graph)
    return out


def gptq_differs_from_rtn() -> bool:
    """Self-check of onnxruntime's bundled GPTQ on a small correlated problem: does error feedback change anything?"""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    from edgevl.calibrate.awq import fake_quantize

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)) @ rng.normal(size=(64, 64))          # correlated input features
    w = rng.normal(size=(64, 16)).astype(np.float32)                     # [K, N]
    q = gptq(w.copy(), 2 * x.T @ x / len(x), group_size=32, blocksize=64)
    return not np.allclose(q, fake_quantize(w, block=32))              # asymmetric 4-bit RTN, blocks of 32 rows


def set_accuracy_level(model: onnx.ModelProto, level: int, bits: int = 4) -> int:
    """Set the accuracy_level of every `bits`-bit MatMulNBits node and every `bits`-bit QMoE node (the
    quantized experts, calibrate/moe.py; same meaning) (0 = float compute, 4 = int8 compute); returns the count.

    The packed weights do not depend on it: the kernel choice happens when a session is made. 8-bit nodes
    always compute in int8: onnxruntime 1.32's float-compute 8-bit kernel is ~150x slower (2B lm_head on a
    2-core EPYC: 1.8 s vs 12 ms per token; 4-bit float: 67 ms).
    """
    count = 0
    for node in model.graph.node:
        key = {"MatMulNBits": "bits", "QMoE": "expert_weight_bits"}.get(node.op_type)
        if key and next((a.i for a in node.attribute if a.name == key), 4) == bits:
            for attr in [a for a in node.attribute if a.name == "accuracy_level"]:
                node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
            count += 1
    return count


# ----------------------------------------------------------------------------- AWQ
AWQ_MAX_ROWS = 512      # sampled activation rows per MatMul input for the alpha search
AWQ_GRID = 20           # alpha in {0, 0.05, ..., 1}


def matmul_input_stats(model_path: Path, inputs: list[str], reader, work: Path, max_rows: int = AWQ_MAX_ROWS,
                       seed: int = 0, threads: int = 0) -> dict:
    """{tensor: awq.RowStats} for the named fp32 activation tensors over every calibration feed of `reader`.

    The fp32 graph runs with those tensors added as graph outputs (a copy in `work`: the graph proto
    only, its weights file linked), one feed at a time; only the requested outputs are computed, and
    each feed's activations are folded into the running statistics before the next feed is read.
    """
    import onnxruntime as ort

    from edgevl.calibrate.awq import RowStats
    from edgevl.calibrate.graph_edit import graph_files

    model_path, work = Path(model_path), Path(work)
    model = onnx.load(str(model_path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in inputs if name not in present)
    for src in graph_files(model_path)[1:]:
        (work / src.name).symlink_to(src.resolve())
    copy = work / model_path.name
    onnx.save(model, str(copy))
    del model
    from edgevl.runtime.backends.ort_session import session_options
    session = ort.InferenceSession(str(copy), session_options(threads), providers=["CPUExecutionProvider"])
    stats = {name: RowStats(max_rows, seed + i) for i, name in enumerate(inputs)}
    while (feed := reader.get_next()) is not None:
        for name, value in zip(inputs, session.run(inputs, feed)):
            stats[name].add(value)
    return stats


def awq_prescale(model: onnx.ModelProto, nodes: list[str], stats: dict, block_size: int, bits: int = 4,
                 grid: int = AWQ_GRID) -> tuple[onnx.ModelProto, list[dict]]:
    """Rescale the fp32 weights of MatMul `nodes` by AWQ scales and put Mul(x, 1/s) before them, in place.

    MatMuls reading the same activation (q/k/v, gate/up) share one s, searched on their weights
    concatenated along N. Where the search keeps alpha = 0 (RTN is best) the group is left untouched.
    The graph computes the same function in fp32 (up to rounding); RTN of the rescaled weights
    (nbits_weights) is then AWQ. Returns the model and one record per group.
    """
    from onnx import numpy_helper

    from edgevl.calibrate.awq import awq_search

    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(nodes)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name in wanted and node.input[1] in inits:
            groups.setdefault(node.input[0], []).append(node)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    records = []
    for x_name, members in groups.items():
        st = stats.get(x_name)
        if st is None or st.rows is None:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in members]
        res = awq_search(np.concatenate(weights, 1), st.rows, st.mean_abs, block_size, grid, bits)
        records.append({"input": x_name, "nodes": [n.name for n in members], "alpha": res.alpha,
                        "rtn_loss": res.rtn_loss, "awq_loss": res.loss, "rows": len(st.rows)})
        if res.alpha == 0:
            continue
        inv = f"{x_name}_awq_inv_scale"
        scaled_x = f"{x_name}_awq"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / res.scales).astype(np.float32), inv))
        model.graph.node.append(onnx.helper.make_node("Mul", [x_name, inv], [scaled_x], name=f"{x_name}_awq_mul"))
        for node, w in zip(members, weights):
            name = node.input[1]
            scaled = numpy_helper.from_array(w * res.scales[:, None], name if uses[name] == 1 else f"{name}_awq")
            if uses[name] == 1:                      # only this MatMul reads it: replace in place
                inits[name].CopyFrom(scaled)
            else:
                model.graph.initializer.append(scaled)
                node.input[1] = scaled.name
            node.input[0] = scaled_x
    topological_sort(model.graph)
    return model, records


def awq_summary(records: list[dict]) -> dict:
    """Report-sized view of awq_prescale's records: alphas, how many groups were rescaled, error vs RTN."""
    if not records:
        return {"groups": 0}
    alphas = [r["alpha"] for r in records]
    gain = [1 - r["awq_loss"] / r["rtn_loss"] for r in records if r["rtn_loss"] > 0]
    return {"groups": len(records), "scaled_groups": sum(a > 0 for a in alphas),
            "alpha": {"min": min(alphas), "median": float(np.median(alphas)), "max": max(alphas)},
            "calib_error_reduction_vs_rtn": {"mean": float(np.mean(gain)) if gain else 0.0,
                                             "min": float(np.min(gain)) if gain else 0.0,
                                             "max": float(np.max(gain)) if gain else 0.0},
            "per_group": [{"nodes": r["nodes"], "alpha": r["alpha"], "rtn_loss": r["rtn_loss"],
                           "awq_loss": r["awq_loss"]} for r in records]}
