"""The benchmark's picture: one row of panels per measured configuration (artifact x backend x workload), read in
seconds.

    vision ms | prefill ms | TTFT ms | decode ms/token | decode ms/token against context length

Each stage panel has one horizontal bar per engine (edgevl on top, then transformers and the peers), every engine
in its own colour in every panel, its name on the axis and its median at the bar's end; edgevl's bar also says
its ratio to the fastest other engine ("0.61x best"). A peer that did not run has an empty bar marked "failed".
The last panel draws each engine's decode time over the contexts it was measured at: the benchmark's own decode
steps (at the prompt's length) joined with the synthetic-cache probes (--decode-contexts), and edgevl's memory
floor. Linear axes starting at zero, so bar lengths compare.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.bench.report import _median, _sides, _sweep_label, engine_label, fmt
from edgevl.bench.stats import median_by_key
from edgevl.extras import requires

STAGES = (("vision_ms", "vision ms"), ("prefill_ms", "prefill ms"), ("ttft_ms", "TTFT ms"),
          ("decode_ms_per_token", "decode ms / token"))
EDGEVL = "#1f6fb4"
FAMILIES = {"edgevl": EDGEVL, "transformers": "#7f7f7f", "llama.cpp": "#d9822b", "openvino": "#2ca02c"}
SPARE = ("#9467bd", "#8c564b", "#e377c2", "#17becf")


def row_colors(row: dict) -> dict[str, str]:
    """Engine label -> colour for a row's engines: a hue per engine (edgevl always the same blue, transformers grey,
    llama.cpp orange, OpenVINO green), a lighter shade of it for each further configuration of the same engine in
    the row (OpenVINO's f32 hints beside its default, say)."""
    from matplotlib.colors import to_hex, to_rgb
    colors, seen, bases, spare = {}, {}, dict(FAMILIES), iter(SPARE * 4)
    for key, side in _entries(row):
        family = side["engine"]
        base = bases.setdefault(family, next(spare))
        k = seen[family] = seen.get(family, -1) + 1
        mix = min(0.6, 0.4 * k)                               # towards white, by configuration
        colors[_label(key, side)] = to_hex(tuple(c + (1 - c) * mix for c in to_rgb(base)))
    return colors


def _entries(row: dict) -> list[tuple[str, dict]]:
    """(key, side) per engine of a row, the failed peers last (key "failed")."""
    return _sides(row) + [("failed", f) for f in row.get("peer_failures") or []]


def _label(key: str, side: dict) -> str:
    return "edgevl" if key == "edgevl" else engine_label(side)


def best_other(row: dict, stage: str) -> float | None:
    """The fastest median of the engines other than edgevl in a row's stage (None when none timed it)."""
    values = [_median(side, stage) for key, side in _sides(row) if key != "edgevl"]
    values = [v for v in values if v]
    return min(values) if values else None


def _bars(ax, row: dict, stage: str, colors: dict[str, str], show_names: bool) -> None:
    entries = _entries(row)
    labels = [_label(k, s) for k, s in entries]
    values = [None if k == "failed" else _median(s, stage) for k, s in entries]
    ys = list(range(len(entries)))[::-1]
    top = max([v for v in values if v] or [1.0])
    ax.barh(ys, [v or 0 for v in values], color=[colors[lbl] for lbl in labels], height=0.7)
    best = best_other(row, stage)
    for y, (key, _), value in zip(ys, entries, values):
        if key == "failed":
            text = "failed"
        elif value is None:
            text = "not timed"
        else:
            text = fmt(value)
            if key == "edgevl" and best:
                text += f"  ({value / best:.2f}× best)"
        ax.text((value or 0) + top * 0.02, y, text, va="center", fontsize=8,
                fontweight="bold" if key == "edgevl" else "normal")
    ax.set_xlim(0, top * 1.55)
    ax.set_yticks(ys, labels if show_names else [""] * len(ys), fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def context_series(report: dict, row: dict) -> list[tuple[str, list[tuple[int, float]]]]:
    """(engine label, [(context, decode ms/token)]) for each engine of a row: the median decode step at the mean
    context of its own runs, plus the synthetic-cache probes of the same engine and configuration."""
    series = []
    for key, side in _sides(row):
        points = []
        decode, steps = _median(side, "decode_ms_per_token"), median_by_key(side.get("decode_by_context") or [])
        if decode and steps:
            points.append((round(sum(c for c, _ in steps) / len(steps)), decode))
        for probe in report.get("context_probes") or []:
            if _probe_matches(probe, row, key, side):
                points += median_by_key(probe["points"])
        if points:
            series.append((_label(key, side), sorted(points)))
    return series


def _probe_matches(probe: dict, row: dict, key: str, side: dict) -> bool:
    if key == "edgevl":
        return probe["engine"] == "edgevl" and probe["artifact"] == row["artifact"]["name"] \
            and probe["backend"] == row["backend"]
    if key == "reference":
        return probe["engine"] == "transformers"
    return probe["engine"] == side.get("peer") and probe["backend"] == side.get("variant")


def _contexts(ax, report: dict, row: dict, colors: dict[str, str]) -> None:
    xs = []
    for label, points in context_series(report, row):
        x, y = zip(*points)
        xs += x
        ax.plot(x, y, "o-", color=colors[label], markersize=4, linewidth=1.5 if label == "edgevl" else 1)
        ax.annotate(label if len(label) < 28 else label[:26] + "…", (x[-1], y[-1]), fontsize=6,
                    xytext=(3, 0), textcoords="offset points", va="center", color=colors[label])
    roof = row["roofline"]
    if roof.get("floor_ms") and xs:
        base, bw = roof["weight_bytes"] + roof["embedding_row_bytes"], roof["bandwidth_bytes_per_s"]
        span = [min(xs), max(xs)]
        ax.plot(span, [(base + roof["kv_per_token_bytes"] * c) / bw * 1e3 for c in span], ":", color=EDGEVL,
                linewidth=1)
        ax.annotate("edgevl's memory floor", (span[0], (base + roof["kv_per_token_bytes"] * span[0]) / bw * 1e3),
                    fontsize=6, xytext=(0, -9), textcoords="offset points", color=EDGEVL)
    if xs:
        ax.set_xlim(0, max(xs) * 1.35)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)", fontsize=7)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def write_plot(report: dict, path: str | Path) -> None:
    """The PNG described in the module docstring."""
    with requires("bench", "--plot"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    rows = report["rows"]
    engines = max((len(_entries(row)) for row in rows), default=1)
    height = max(1.6, 0.32 * engines + 0.9)
    fig, axes = plt.subplots(len(rows), len(STAGES) + 1, figsize=(19, height * len(rows) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(STAGES) + [1.25]})
    for r, row in enumerate(rows):
        colors = row_colors(row)
        for c, (stage, title) in enumerate(STAGES):
            _bars(axes[r][c], row, stage, colors, show_names=c == 0)
            axes[r][c].set_title(title if r == 0 else "", fontsize=9)
        _contexts(axes[r][-1], report, row, colors)
        axes[r][-1].set_title("decode ms / token against context" if r == 0 else "", fontsize=9)
        axes[r][0].set_ylabel(_sweep_label(row), fontsize=8, rotation=0, ha="right", va="center", labelpad=10,
                              wrap=True)
    machine = report["machine"]["cpu_model"]
    fig.suptitle("; ".join([f"edgevl bench — {machine}, medians, lower is better", *report.get("notes", [])])[:170],
                 fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
