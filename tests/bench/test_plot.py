"""The benchmark picture's pure parts: colours per engine, the ratio edgevl's bars carry, the context series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgevl.bench import plot

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def compare():
    return json.loads((RESULTS / "compare-cpu-amd-epyc-2c.json").read_text())


def test_each_engine_keeps_its_hue_and_a_second_configuration_is_a_shade_of_it(compare):
    row = compare["rows"][0]
    colors = plot.row_colors(row)
    assert colors["edgevl"] == plot.EDGEVL and colors["transformers"] == plot.FAMILIES["transformers"]
    default, f32 = colors["openvino fp32, default precision"], colors["openvino fp32, f32 precision"]
    assert default == plot.FAMILIES["openvino"] and f32 != default
    assert len(set(colors.values())) == len(colors)
    assert plot.FAMILIES["edgevl"] == plot.EDGEVL          # the module's table is not changed by drawing


def test_edgevls_ratio_is_to_the_fastest_other_engine(compare):
    row = compare["rows"][0]
    others = [s["stages"]["ttft_ms"]["median"] for s in [row["reference"], *row["peers"]]]
    assert plot.best_other(row, "ttft_ms") == min(others)
    failed = {**row, "peers": [], "reference": None, "peer_failures": [{"engine": "llama.cpp", "peer": "llama.cpp",
                                                                        "variant": "Q8_0", "failed": "SIGSEGV"}]}
    assert plot.best_other(failed, "ttft_ms") is None


def test_context_series_join_the_runs_decode_steps_with_the_probes(compare):
    row = compare["rows"][0]
    series = dict(plot.context_series(compare, row))
    xs = [c for c, _ in series["edgevl"]]
    assert len(xs) == 2 and xs[0] < 1000 and xs[1] == 4096        # its own run at ~300 tokens, the probe at 4096
    assert series["edgevl"][0][1] == row["edgevl"]["stages"]["decode_ms_per_token"]["median"]
    assert len(series["openvino fp32, default precision"]) == 1      # OpenVINO exposes no probe
    assert [c for c, _ in series["transformers"]][-1] == 4096
