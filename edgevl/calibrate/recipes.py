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
  w4a16   decoder (int4.py): 4-bit block-wise MatMulNBits weights (RTN / HQQ / GPTQ / AWQ); activations
          float, or int8-computed per block (accuracy_level 4) when measured to cost < 10% more KL; prompts
          on int8 copies of the weights by default on ort-cpu (int8_prefill) when measured the same way;
          vision: int8 if its measured error is within half the gate's budget, else fp16

Sensitive groups (node_groups: patch_embed, merger, lm_head) start at the recipe's precision.
When a graph drops more than half of --max-drop on calibration samples, they are raised one
step at a time (int4 -> int8 -> fp32), each raise kept only if it removes at least MIN_GAIN of
the graph's measured loss (1 - cosine for vision, KL for the decoder).
"""

from __future__ import annotations

from pathlib import Path

from edgevl.artifact import names
from edgevl.artifact.onnx_files import save_graph
from edgevl.calibrate import moe, passes
from edgevl.calibrate.context import Context, GraphResult, brief, discard, search_levels, with_experts
from edgevl.calibrate.graph_edit import gemm_to_matmul, load_graph, node_groups, weight_nodes, with_shapes
from edgevl.calibrate.int4 import int4_decoder
from edgevl.calibrate.options import QuantizeOptions


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
    return with_experts(best_int8_variant(ctx, names.DECODER, src, weights, groups, {"lm_head": ("int8", "fp32")},
                                           rows), experts)


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
            discard(other[0])
    measured = ", ".join(f"{m} loss {v[1]['loss']:.4g} {v[1].get(SPEED_KEY[graph], 0):.4g} ms"
                         for m, v in variants.items())
    how = f"int8 QDQ static ({ctx.opts.method})" if mode == "static" else "int8 dynamic activations"
    reason = f"{mode} kept (the fastest within half of --max-drop, else the most accurate: {measured} " \
             f"on calibration samples)" if len(variants) > 1 else \
        f"{mode} (--activations {ctx.opts.activations})"
    return GraphResult(path, "int8", f"{how}, per-channel weights", kept, trials,
                       {"activations": mode, "calibration": score,
                        "variants": {m: brief(v[1]) for m, v in variants.items()},
                        "notes": {"activations": reason}})


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
