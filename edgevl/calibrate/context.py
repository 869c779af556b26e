"""What a recipe works with: the Context it is given (calibration feeds, options, the scoring backend), the
GraphResult it returns per graph, and the search that raises sensitive groups one precision step at a time."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevl.artifact.folder import Artifact, GraphFile
from edgevl.artifact.onnx_files import describe_graph
from edgevl.calibrate.data import FeedStore, feed_reader
from edgevl.calibrate.graph_edit import graph_precision
from edgevl.calibrate.options import QuantizeOptions
from edgevl.calibrate.report import score_graph
from edgevl.runtime.backends.table import Backend

MIN_GAIN = 0.2     # a raised group must remove >= 20% of the graph's measured loss


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

    def score(self, kind: str, path: Path, backend: Backend | None = None) -> dict:
        """A candidate graph (in the work folder, outside any artifact) scored on calibration feeds, run by
        the user's backend like the artifact will be (or by `backend`, the user's with other options)."""
        source = self.src.manifest.graph(kind)          # same inputs and cache layout as the graph it came from
        spec = describe_graph(path, kind, graph_precision(path), source.variant, source.kv_cache)
        runner = (backend or self.backend).make_runner(GraphFile.standalone(path, spec, self.src.config))
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
    int8_prefill: bool = False        # 4-bit decoders: prompts measured fine on int8 copies (manifest GraphSpec)


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
    trials = [{"levels": dict(levels), **brief(score)}]
    chosen, base = trials[0], score
    for g in groups:
        for level in ladders[g][1:]:
            if score["drop"] <= ctx.max_drop / 2 or score["loss"] <= 1e-9:
                break
            ctx.log(f"{graph}: measuring {g} at {level}")
            candidate = {**levels, g: level}
            cand_path = build(candidate)
            cand = ctx.score(graph, cand_path)
            trials.append({"levels": dict(candidate), **brief(cand)})
            if cand["loss"] <= score["loss"] * (1 - MIN_GAIN):
                discard(path)
                levels, path, score, chosen = candidate, cand_path, cand, trials[-1]
            else:
                discard(cand_path)
    kept = [{"group": g, "nodes": groups[g], "precision": levels[g],
             "why": f"all at {ladders[g][0]} the graph dropped {base['drop']:.4g} on calibration samples (more than "
                    f"half of --max-drop); {g} at {levels[g]} cuts the loss {base['loss']:.4g} -> "
                    f"{score['loss']:.4g} ({pct(base['loss'], score['loss'])} less)"}
            for g in groups if levels[g] != ladders[g][0]]
    chosen["chosen"] = True
    return path, score, kept, trials


def discard(path: Path) -> None:
    """Drop a graph that lost a comparison (its folder, .data included): 7B-sized trials add up."""
    shutil.rmtree(path.parent, ignore_errors=True)


def brief(score: dict) -> dict:
    return {k: v for k, v in score.items() if isinstance(v, (int, float))}


def pct(before: float, after: float) -> str:
    return f"{100 * (before - after) / before:.0f}%" if before > 0 else "0%"


def with_experts(result: GraphResult, experts: dict) -> GraphResult:
    """The MoE experts' quantization (calibrate/moe.py) in a decoder's result, when the model has experts."""
    if experts:
        result.details["experts"] = experts["experts"]
        result.details.setdefault("notes", {})["experts"] = experts["note"]
        result.description += f"; {experts['note']}"
    return result
