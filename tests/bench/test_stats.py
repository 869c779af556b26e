"""bench/stats.py: percentiles and summaries equal numpy's, their edge cases, and the roofline arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevl.bench import stats


@pytest.mark.parametrize("values", [[3.0], [5, 1, 4, 2], list(range(11)), [0.5, 9.25, 7.0, 7.0, 1.5, 100.0]])
def test_percentiles_match_numpy(values):
    for q in (0, 10, 50, 90, 100):
        assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))
    s = stats.summarize(values)
    assert s["median"] == pytest.approx(np.median(values))
    assert s["p90"] == pytest.approx(np.percentile(values, 90))
    assert s["min"] == min(values) and s["max"] == max(values) and s["n"] == len(values)


def test_summary_edge_cases():
    assert stats.summarize([]) is None
    assert math.isnan(stats.percentile([], 50))
    assert stats.summarize([1, 2, 3, 4, 100])["median"] == 3           # the median ignores the outlier
    with pytest.raises(ValueError):
        stats.percentile([1], 101)
    assert stats.ratio(50.0, 100.0) == 0.5
    assert stats.ratio(None, 1.0) is None and stats.ratio(1.0, 0.0) is None and stats.ratio(1.0, None) is None
    assert stats.tokens_per_second(20.0) == 50.0 and stats.tokens_per_second(None) is None
    assert stats.median_by_key([(5, 1.0), (3, 2.0), (5, 3.0), (5, 10.0)]) == [(3, 2.0), (5, 3.0)]


def test_roofline_arithmetic():
    assert stats.tensor_bytes([1536, 8960], "float32") == 1536 * 8960 * 4
    assert stats.tensor_bytes([1536, 8960], "float16") == 1536 * 8960 * 2
    assert stats.tensor_bytes([3, 5], "int4") == 8                      # 15 nibbles -> 8 bytes
    assert stats.tensor_bytes([], "float32") == 4                       # a scalar
    with pytest.raises(ValueError):
        stats.tensor_bytes([2], "complex64")
    total = stats.decode_bytes_per_token(1_000_000_000, 6144, 57_344_000)
    assert total == 1_057_350_144
    assert stats.floor_ms(total, 20e9) == pytest.approx(total / 20e9 * 1e3)   # ~52.9 ms at 20 GB/s
    assert stats.floor_ms(total, 0) is None
    assert stats.bandwidth(1e9, 0.05) == 2e10 and stats.bandwidth(1, 0) == math.inf
