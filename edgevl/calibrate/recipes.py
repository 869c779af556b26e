"""Recipes: what happens to each graph, as small handlers with two verbs.

    recipe.make(ctx)          -> {"vision": GraphResult, "decoder": GraphResult}   (quantized graphs in ctx.work)
    recipe.options(opts)      -> the QuantizeOptions it used, recorded in the manifest's quantization

The result is an ordinary artifact: the normal runtime (Pipeline.load) runs it.

  fp16    both graphs fp16; fp32 stays for norms, softmax, edgevl::MRoPE and every node whose
          calibrated activation range exceeds fp16's range (with 8x headroom)
  int8    both graphs: int8 per-channel weights; activations per --activations: static (QDQ,
          calibrated), dynamic, or auto = both built and measured on calibration samples, the fastest
          one whose calibration drop is within half of --max-drop kept, else the more accurate
          (pick_variant; both in the report)
  w4a16   decoder: 4-bit block-wise MatMulNBits weights (RTN / HQQ / GPTQ / AWQ); activations float, or
          int8-computed per block (accuracy_level 4) when measured to cost < 10% more KL;
          vision: int8 if its measured error is within half the gate's budget, else fp16

Sensitive groups (node_groups: patch_embed, merger, lm_head) start at the recipe's precision.
When a graph drops more than half of --max-drop on calibration samples, they are raised one
step at a time (int4 -> int8 -> fp32), each raise kept only if it removes at least MIN_GAIN of
the graph's measured loss (1 - cosine for vision, KL for the decoder).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgevl.artifact import names
from edgevl.artifact.folder import Artifact, GraphFile
from edgevl.artifact.onnx_files import describe_graph, save_graph
from edgevl.calibrate import moe, passes
from edgevl.calibrate.data import FeedStore, feed_reader
from edgevl.calibrate.graph_edit import (
    gemm_to_matmul,
    graph_precision,
    load_graph,
    node_groups,
    weight_nodes,
    with_shapes,
)
from edgevl.calibrate.options import QuantizeOptions
from edgevl.calibrate.report import score_graph
from edgevl.runtime.backends.table import Backend

MIN_GAIN = 0.2     # a raised group must remove >= 20% of the graph's measured loss
COMPUTE_SLACK = 0.1  # int8 compute of 4-bit matmuls is kept if it adds < 10% to the decoder's calibration KL


@dataclass
class Context:
    """Everything a recipe needs: the FP32 artifact, recorded calibration feeds, the user's options and the
    backend that scores candidates."""

    src: Artifact
    work: Path
    store: FeedStore                 # calibration feeds (never the held-out ones)
    opts: QuantizeOptions
    max_drop: float                  # the recipe's default unless --max-drop
    backend: Backend
    decision_samples: int = 8        # calibration samples that score trials
    log: Callable[[str], None] = lambda msg: None
    _names: itertools.count = field(default_factory=itertools.count)

    def reader(self, graph: str, what: str):
        """A fresh CalibrationDataReader over this graph's calibration feeds."""
        return feed_reader(self.store, graph, desc=f"{graph} {what}" if self.opts.progress else None)

    def tmp(self, stem: str) -> Path:
        folder = self.work / f"{stem}-{next(self._names)}"   # own folder: a graph may bring a .data file
        folder.mkdir(parents=True)
        return folder / f"{stem}.onnx"

    def score(self, kind: str, path: Path) -> dict:
        """A candidate graph (in the work folder, outside any artifact) scored on calibration feeds, run by
        the user's backend like the artifact will be."""
        spec = describe_graph(path, kind, graph_precision(path))
        runner = self.backend.make_runner(GraphFile.standalone(path, spec, self.src.config))
        runner.activate()
        try:
            return score_graph(kind, runner, self.store, self.decision_samples)
        finally:
            runner.deactivate()


@dataclass
class GraphResult:
    path: Path                        # the quantized graph (in ctx.work)
    precision: str                    # short: fp16 | int8 | int4
    description: str                  # what was done, one line
    kept: list[dict] = field(default_factory=list)     # groups kept at higher precision, and why
    trials: list[dict] = field(default_factory=list)   # every measured alternative
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- sensitive groups
def search_levels(ctx: Context, graph: str, groups: dict[str, list[str]], ladders: dict[str, tuple[str, ...]],
                  build: Callable[[dict], Path]) -> tuple[Path, dict, list[dict], list[dict]]:
    """Raise sensitive groups one precision step at a time while the graph loses too much.

    "Too much": the graph's calibration drop (1 - cosine, or 1 - top-1) exceeds half of
    --max-drop. A raise is kept only if it removes >= MIN_GAIN of the measured loss (1 - cosine,
    or KL): precision is spent where it buys accuracy, not where the graph is already fine.
    Returns (graph path, its calibration score, kept groups with reasons, all trials).
    """
    groups = {g: nodes for g, nodes in groups.items() if nodes and g in ladders}
    levels = {g: ladders[g][0] for g in groups}
    path = build(levels)
    score = ctx.score(graph, path)
    trials = [{"levels": dict(levels), **_brief(score)}]
    chosen, base = trials[0], score
    for g in groups:
        for level in ladders[g][1:]:
            if score["drop"] <= ctx.max_drop / 2 or score["loss"] <= 1e-9:
                break
            ctx.log(f"{graph}: measuring {g} at {level}")
            candidate = {**levels, g: level}
            cand_path = build(candidate)
            cand = ctx.score(graph, cand_path)
            trials.append({"levels": dict(candidate), **_brief(cand)})
            if cand["loss"] <= score["loss"] * (1 - MIN_GAIN):
                _discard(path)
                levels, path, score, chosen = candidate, cand_path, cand, trials[-1]
            else:
                _discard(cand_path)
    kept = [{"group": g, "nodes": groups[g], "precision": levels[g],
             "why": f"all at {ladders[g][0]} the graph dropped {base['drop']:.4g} on calibration samples (more than "
                    f"half of --max-drop); {g} at {levels[g]} cuts the loss {base['loss']:.4g} -> "
                    f"{score['loss']:.4g} ({_pct(base['loss'], score['loss'])} less)"}
            for g in groups if levels[g] != ladders[g][0]]
    chosen["chosen"] = True
    return path, score, kept, trials


def _discard(path: Path) -> None:
    """Drop a graph that lost a comparison (its folder, .data included): 7B-sized trials add up."""
    shutil.rmtree(path.parent, ignore_errors=True)


def _brief(score: dict) -> dict:
    return {k: v for k, v in score.items() if isinstance(v, (int, float))}


def _pct(before: float, after: float) -> str:
    return f"{100 * (before - after) / before:.0f}%" if before > 0 else "0%"


# ----------------------------------------------------------------------------- per-graph builders
def fp16_graph(ctx: Context, graph: str) -> GraphResult:
    src = ctx.src.graph_path(graph)
    absmax = passes.tensor_absmax(src, ctx.reader(graph, "ranges"), ctx.tmp(f"{graph}-ranges").parent)
    model = with_shapes(src)
    hot = passes.overflow_nodes(model, absmax)
    converted = passes.fp16_convert(model, set(hot), keep_io=[names.LOGITS] if graph == names.DECODER else [])
    path = ctx.tmp(f"{graph}-fp16")
    save_graph(converted, path)
    kept = [{"group": "calibrated range", "nodes": sorted(hot), "precision": "fp32",
             "why": "; ".join(sorted(set(hot.values())))}] if hot else []
    top, limit = max(absmax.values(), default=0.0), passes.FP16_MAX / passes.FP16_HEADROOM
    return GraphResult(path, "fp16", "fp16; fp32 norms, softmax, MRoPE" + (f", {len(hot)} range nodes" if hot else ""),
                       kept=kept, details={"max_abs_activation": top, "fp16_limit": limit,
                                           "calibration": ctx.score(graph, path),
                                           "notes": {"ranges": f"largest calibrated |activation| {top:.4g}; "
                                                               f"{len(hot)} nodes kept fp32 past {limit:.4g}"}})


def int8_vision(ctx: Context) -> GraphResult:
    """Static QDQ (what TensorRT takes) and/or dynamic activations, per --activations; the lower loss wins."""
    src = ctx.tmp("vision-matmul")
    model = gemm_to_matmul(load_graph(ctx.src.graph_path(names.VISION)))    # dynamic int8 quantizes MatMul only
    save_graph(model, src, check=False)
    weights = [n.name for n in weight_nodes(model)]
    groups = node_groups(model)
    del model
    return best_int8_variant(ctx, names.VISION, src, weights, groups, {"patch_embed": ("int8", "fp32"),
                                                                   "merger": ("int8", "fp32")})


def int8_decoder(ctx: Context) -> GraphResult:
    """Static and/or dynamic activations, per --activations; the lower calibration KL wins."""
    src = ctx.tmp("decoder-matmul")
    model = gemm_to_matmul(load_graph(ctx.src.graph_path(names.DECODER)))   # lm_head Gemm -> MatMul
    experts = moe.quantize_graph_experts(model, 8, 128)
    save_graph(model, src, check=False)
    weights = [n.name for n in weight_nodes(model)]
    groups = {"lm_head": node_groups(model).get("lm_head", [])}
    del model
    # onnxruntime graphs: lm_head in 8-bit MatMulNBits rows (int8 compute; faster than dynamic int8 on the
    # 2B's 151936 x 1536 head), which a tied embedding table then shares. TensorRT graphs keep Q/DQ.
    rows = ("lm_head",) if ctx.src.manifest.graph(names.DECODER).variant == "ort" else ()
    return _with_experts(best_int8_variant(ctx, names.DECODER, src, weights, groups, {"lm_head": ("int8", "fp32")},
                                           rows), experts)


def _with_experts(result: GraphResult, experts: dict) -> GraphResult:
    """The MoE experts' quantization (calibrate/moe.py) in a decoder's result, when the model has experts."""
    if experts:
        result.details["experts"] = experts["experts"]
        result.details.setdefault("notes", {})["experts"] = experts["note"]
        result.description += f"; {experts['note']}"
    return result


SPEED_KEY = {names.VISION: "ms_per_image", names.DECODER: "decode_ms"}


def pick_variant(scores: dict[str, dict], max_drop: float, speed_key: str) -> str:
    """The fastest variant whose calibration drop is within half of --max-drop (accuracy to spare
    buys nothing); when none is, the one with the lowest loss."""
    good = [m for m, s in scores.items() if s["drop"] <= max_drop / 2]
    if good:
        return min(good, key=lambda m: scores[m].get(speed_key, 0.0))
    return min(scores, key=lambda m: scores[m]["loss"])


def best_int8_variant(ctx: Context, graph: str, src: Path, weights: list[str], groups: dict,
                      ladders: dict, rows: tuple[str, ...] = ()) -> GraphResult:
    """Build the int8 graph with each activation mode --activations allows; keep per `pick_variant`.
    Groups in `rows` become 8-bit MatMulNBits (blocks of 128 along the input) at int8, not Q/DQ or dynamic."""
    in_rows = {n for g in rows for n in groups.get(g, [])}

    def builder(mode):
        def build(levels):
            skip = {n for g, level in levels.items() if level == "fp32" for n in groups.get(g, [])}
            nodes = [n for n in weights if n not in skip and n not in in_rows]
            dst = ctx.tmp(f"{graph}-int8-{mode}")
            if mode == "dynamic":
                passes.int8_dynamic(src, dst, nodes)
            else:
                passes.int8_static(src, dst, ctx.reader(graph, "int8 calibration"), ctx.opts.method, nodes)
            blocks = sorted(n for g in rows if levels.get(g) == "int8" for n in groups.get(g, []))
            if blocks:
                save_graph(passes.nbits_weights(load_graph(dst), blocks, 8, 128, "rtn"), dst)
            return dst
        return build

    modes = ("dynamic", "static") if ctx.opts.activations == "auto" else (ctx.opts.activations,)
    variants = {}
    for mode in modes:
        ctx.log(f"{graph}: int8 with {mode} activations")
        variants[mode] = search_levels(ctx, graph, groups, ladders, builder(mode))
    mode = pick_variant({m: v[1] for m, v in variants.items()}, ctx.max_drop, SPEED_KEY[graph])
    path, score, kept, trials = variants[mode]
    for other in variants.values():
        if other[0] != path:
            _discard(other[0])
    measured = ", ".join(f"{m} loss {v[1]['loss']:.4g} {v[1].get(SPEED_KEY[graph], 0):.4g} ms"
                         for m, v in variants.items())
    how = f"int8 QDQ static ({ctx.opts.method})" if mode == "static" else "int8 dynamic activations"
    reason = f"{mode} kept (the fastest within half of --max-drop, else the most accurate: {measured} " \
             f"on calibration samples)" if len(variants) > 1 else \
        f"{mode} (--activations {ctx.opts.activations})"
    return GraphResult(path, "int8", f"{how}, per-channel weights", kept, trials,
                       {"activations": mode, "calibration": score,
                        "variants": {m: _brief(v[1]) for m, v in variants.items()},
                        "notes": {"activations": reason}})


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
    return _with_experts(GraphResult(
        path, "int4", f"int4 MatMulNBits ({algorithm}, block {ctx.opts.block_size}), {compute} activations", kept,
        trials, {"block_size": ctx.opts.block_size, "algorithm": algorithm, "calibration": score, "compute": compute,
                 **details, "notes": {"compute": note, **_awq_note(details)}}), experts)


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
        scores[name] = _brief(ctx.score(names.DECODER, path))
        _discard(path)
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
    chosen = next(t for t in trials if t.get("chosen"))
    trials.append({"levels": {**chosen["levels"], "accuracy_level": 4}, **_brief(alt_score)})
    note = (f"calibration KL {score['kl_mean']:.4g} / {score['decode_ms']:.2f} ms per step with float activations, "
            f"{alt_score['kl_mean']:.4g} / {alt_score['decode_ms']:.2f} ms with int8 compute")
    if alt_score["loss"] <= score["loss"] * (1 + COMPUTE_SLACK) + 1e-9:
        chosen.pop("chosen")
        trials[-1]["chosen"] = True
        _discard(path)
        return alt, alt_score, "int8-compute", "int8 compute (accuracy_level 4) kept: " + note
    _discard(alt)
    return path, score, "float", "float activations kept: " + note


# ----------------------------------------------------------------------------- recipes
class Recipe:
    """A recipe: `make` the quantized graphs, and what it adds to the manifest (`options`)."""

    name = ""
    default_max_drop = 0.05
    option_fields: tuple[str, ...] = ()        # the QuantizeOptions it uses, recorded in the manifest

    def make(self, ctx: Context) -> dict[str, GraphResult]:
        raise NotImplementedError

    def options(self, opts: QuantizeOptions) -> dict:
        return {name: getattr(opts, name) for name in self.option_fields}

    def check(self, opts: QuantizeOptions) -> None:
        """Refuse what this recipe cannot do here, before calibration starts."""


class Fp16(Recipe):
    name = "fp16"
    default_max_drop = 0.01

    def make(self, ctx):
        return {names.VISION: fp16_graph(ctx, names.VISION), names.DECODER: fp16_graph(ctx, names.DECODER)}


class Int8(Recipe):
    name = "int8"
    default_max_drop = 0.05
    option_fields = ("method", "activations")

    def make(self, ctx):
        return {names.VISION: int8_vision(ctx), names.DECODER: int8_decoder(ctx)}


class W4A16(Recipe):
    name = "w4a16"
    default_max_drop = 0.10
    option_fields = ("method", "activations", "w4_algorithm", "block_size")

    def check(self, opts: QuantizeOptions) -> None:
        if opts.w4_algorithm != "rtn":
            passes.nbits_weights(None, [], 4, opts.block_size, opts.w4_algorithm, check_only=True)

    def make(self, ctx):
        decoder = int4_decoder(ctx)
        int8, fp16 = int8_vision(ctx), fp16_graph(ctx, names.VISION)
        int8_drop = int8.details["calibration"]["drop"]
        vision = int8 if int8_drop <= ctx.max_drop / 2 else fp16
        fp16_drop = fp16.details["calibration"]["drop"]
        vision.details["choice"] = {
            "int8_drop": int8_drop, "fp16_drop": fp16_drop, "chosen": vision.precision,
            "rule": f"int8 when its calibration drop is <= half of --max-drop ({ctx.max_drop / 2:g}), else fp16"}
        vision.details.setdefault("notes", {})["int8 or fp16"] = (
            f"{vision.precision} chosen: calibration cosine drop int8 {int8_drop:.4g}, fp16 {fp16_drop:.4g} "
            f"(int8 when <= {ctx.max_drop / 2:g})")
        return {names.VISION: vision, names.DECODER: decoder}


RECIPES: dict[str, Recipe] = {r.name: r for r in (Fp16(), Int8(), W4A16())}
