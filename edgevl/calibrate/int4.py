"""The w4a16 recipe's decoder: every weight MatMul to 4-bit MatMulNBits blocks (RTN / HQQ / GPTQ / AWQ), the
lm_head's precision searched, then two measured choices for onnxruntime's CPU kernels: int8 compute inside the
4-bit matmuls (accuracy_level 4) and int8 copies of the weights for prompts (the manifest's int8_prefill)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from edgevl.artifact import names
from edgevl.artifact.onnx_files import save_graph
from edgevl.calibrate import moe, passes
from edgevl.calibrate.context import Context, GraphResult, brief, discard, search_levels, with_experts
from edgevl.calibrate.graph_edit import gemm_to_matmul, load_graph, node_groups, weight_nodes

COMPUTE_SLACK = 0.1  # int8 compute / int8 prefill is kept if it adds < 10% to the decoder's calibration KL


def int4_decoder(ctx: Context) -> GraphResult:
    """Every constant-weight MatMul to 4-bit blocks; lm_head (exported as Gemm) decided by measurement."""
    model = load_graph(ctx.src.graph_path(names.DECODER))
    groups = {"lm_head": node_groups(model).get("lm_head", [])}
    body = [n.name for n in weight_nodes(model) if n.op_type == "MatMul" and n.name not in groups["lm_head"]]
    reader = ctx.reader(names.DECODER, "gptq") if ctx.opts.w4_algorithm == "gptq" else None
    details, algorithm = {}, ctx.opts.w4_algorithm
    if algorithm == "awq":
        details["awq"] = _awq_prescale(ctx, model, body)
    ctx.log(f"decoder: 4-bit {algorithm} weights, block {ctx.opts.block_size}")
    base = gemm_to_matmul(passes.nbits_weights(model, body, 4, ctx.opts.block_size, algorithm, reader))
    del model
    if algorithm == "awq":
        base, algorithm = _awq_or_rtn(ctx, base, body, groups["lm_head"], details["awq"])
    experts = moe.quantize_graph_experts(base, 4, ctx.opts.block_size)

    def build(levels):
        graph = onnx.ModelProto()
        graph.CopyFrom(base)
        level = levels.get("lm_head", "fp32")
        if level != "fp32":
            graph = passes.nbits_weights(graph, groups["lm_head"], int(level[3:]), ctx.opts.block_size, "rtn")
        dst = ctx.tmp("decoder-int4")
        save_graph(graph, dst)
        return dst

    path, score, kept, trials = search_levels(ctx, names.DECODER, groups, {"lm_head": ("int4", "int8", "fp32")}, build)
    path, score, compute, note = _choose_compute(ctx, path, score, trials)
    int8_prefill, prefill_note = _choose_prefill(ctx, path, score, trials)
    return with_experts(GraphResult(
        path, "int4", f"int4 MatMulNBits ({algorithm}, block {ctx.opts.block_size}), {compute} activations"
        + (", int8 prefill" if int8_prefill else ""), kept,
        trials, {"block_size": ctx.opts.block_size, "algorithm": algorithm, "calibration": score, "compute": compute,
                 **details, "notes": {"compute": note, **prefill_note, **_awq_note(details)}},
        int8_prefill=int8_prefill), experts)


def _awq_prescale(ctx: Context, model: onnx.ModelProto, body: list[str]) -> dict:
    """AWQ scales for the decoder's `body` MatMuls, from the calibration feeds, applied to `model` in place."""
    inputs = sorted({n.input[0] for n in model.graph.node if n.name in set(body)})
    ctx.log(f"decoder: AWQ statistics of {len(inputs)} MatMul inputs over the calibration feeds")
    stats = passes.matmul_input_stats(ctx.src.graph_path(names.DECODER), inputs, ctx.reader(names.DECODER, "awq"),
                                      ctx.tmp("decoder-awq").parent, threads=ctx.backend.options.threads)
    ctx.log("decoder: AWQ scale search per MatMul group")
    _, records = passes.awq_prescale(model, body, stats, ctx.opts.block_size)
    return passes.awq_summary(records)


def _awq_or_rtn(ctx: Context, awq_base: onnx.ModelProto, body: list[str], lm_head: list[str],
                summary: dict) -> tuple[onnx.ModelProto, str]:
    """The AWQ decoder against plain RTN, whole graphs measured on calibration samples (lm_head at int4, float
    compute both): AWQ's search minimises each MatMul's output error, not the model's KL, so it is kept only
    when the decoder's KL is not higher. Both numbers go to the report."""
    ctx.log("decoder: measuring AWQ against plain RTN on calibration samples")
    rtn_base = gemm_to_matmul(passes.nbits_weights(load_graph(ctx.src.graph_path(names.DECODER)), body, 4,
                                                   ctx.opts.block_size, "rtn"))
    scores = {}
    for name, base in (("awq", awq_base), ("rtn", rtn_base)):
        graph = passes.nbits_weights(_copy(base), lm_head, 4, ctx.opts.block_size, "rtn")
        path = ctx.tmp(f"decoder-{name}")
        save_graph(graph, path)
        del graph
        scores[name] = brief(ctx.score(names.DECODER, path))
        discard(path)
    kept = "awq" if scores["awq"]["loss"] <= scores["rtn"]["loss"] else "rtn"
    summary["vs_rtn"] = {"awq": scores["awq"], "rtn": scores["rtn"], "kept": kept}
    return (awq_base if kept == "awq" else rtn_base), kept


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _awq_note(details: dict) -> dict:
    awq = details.get("awq")
    if not awq or not awq.get("groups"):
        return {}
    a, g = awq["alpha"], awq["calib_error_reduction_vs_rtn"]
    note = (f"{awq['scaled_groups']}/{awq['groups']} MatMul input groups rescaled (alpha median {a['median']:.2f}, "
            f"range {a['min']:.2f}-{a['max']:.2f}); per-MatMul calibration output error {100 * g['mean']:.0f}% "
            f"below RTN on average")
    vs = awq.get("vs_rtn")
    if vs:
        note += (f"; decoder calibration KL awq {vs['awq']['kl_mean']:.4g} vs rtn {vs['rtn']['kl_mean']:.4g}: "
                 f"{vs['kept']} kept")
    return {"awq": note}


def _chosen(trials: list) -> dict:
    return next(t for t in trials if t.get("chosen"))


def _within_slack(alt: dict, base: dict) -> bool:
    """The one rule for both CPU-speed choices: `alt`'s calibration loss adds at most COMPUTE_SLACK to `base`'s."""
    return alt["loss"] <= base["loss"] * (1 + COMPUTE_SLACK) + 1e-9


def _choose_compute(ctx: Context, path: Path, score: dict, trials: list) -> tuple[Path, dict, str, str]:
    """MatMulNBits' accuracy_level, measured: 0 computes with float activations (w4a16 proper); 4 quantizes
    each K-block of the activations to int8 and uses int8 dot products, several times faster on CPUs
    without fast float int4 kernels (AVX2). int8 compute is kept when it adds < COMPUTE_SLACK to the KL.
    GPU providers ignore the attribute, so the choice costs them nothing."""
    ctx.log("decoder: measuring int8 compute of the 4-bit matmuls (accuracy_level 4)")
    graph = load_graph(path)
    passes.set_accuracy_level(graph, 4)
    alt = ctx.tmp("decoder-int4-acc4")
    save_graph(graph, alt)
    del graph
    alt_score = ctx.score(names.DECODER, alt)
    chosen = _chosen(trials)
    trials.append({"levels": {**chosen["levels"], "accuracy_level": 4}, **brief(alt_score)})
    note = (f"calibration KL {score['kl_mean']:.4g} / {score['decode_ms']:.2f} ms per step with float activations, "
            f"{alt_score['kl_mean']:.4g} / {alt_score['decode_ms']:.2f} ms with int8 compute")
    if _within_slack(alt_score, score):
        chosen.pop("chosen")
        trials[-1]["chosen"] = True
        discard(path)
        return alt, alt_score, "int8-compute", "int8 compute (accuracy_level 4) kept: " + note
    discard(alt)
    return path, score, "float", "float activations kept: " + note


def _choose_prefill(ctx: Context, path: Path, score: dict, trials: list) -> tuple[bool, dict]:
    """Whether ort-cpu may run this 4-bit decoder's prompts on int8 copies of its weights by default
    (runtime/backends/int8_prefill.py: about twice the prefill speed on CPUs with int8 dot products), measured:
    kept when the calibration KL with it stays within COMPUTE_SLACK of the graph's own. Only where the
    quantizing backend is ort-cpu (the one that runs it); ({} or the note for the report)."""
    if ctx.backend.name != "ort-cpu":
        return False, {}
    ctx.log("decoder: measuring prompts on int8 copies of the 4-bit weights (int8 prefill)")
    backend = replace(ctx.backend, options=replace(ctx.backend.options, int8_prefill=True))
    alt = ctx.score(names.DECODER, path, backend)
    trials.append({"levels": {**_chosen(trials)["levels"], "prefill": "int8"}, **brief(alt)})
    kept = _within_slack(alt, score)
    note = (f"int8 prefill {'kept' if kept else 'not kept'}: calibration KL {alt['kl_mean']:.4g} with prompts on "
            f"int8 copies, {score['kl_mean']:.4g} without (kept within +{COMPUTE_SLACK:.0%})")
    return kept, {"prefill": note}
