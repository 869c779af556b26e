"""Pure arithmetic for `edgevl bench`: summary statistics, ratios and the decode roofline.

No numpy, no I/O: everything here is a function of plain numbers so it is easy to
test and to reason about.

Percentiles interpolate linearly between order statistics (numpy's default
"linear" method): p(q) of sorted x[0..n-1] is x at rank q*(n-1).

Roofline: a batch-1 decode step has to stream every weight of the decoder graph
from memory once (plus the embedding row of the fed token and the whole KV cache),
so bytes_read / memory_bandwidth is a floor on its latency. The floor says how far a
measured number is from what the memory system allows; it ignores compute, caches
larger than nothing, and overlap, so real kernels sit above it.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

STAT_KEYS = ("median", "p90", "min", "max", "mean", "n")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    rank = q / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: Iterable[float]) -> dict | None:
    """median, p90, min, max, mean and count of `values`; None when there are none."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    return {"median": percentile(xs, 50), "p90": percentile(xs, 90), "min": min(xs), "max": max(xs),
            "mean": sum(xs) / len(xs), "n": len(xs)}


def ratio(ours: float | None, reference: float | None) -> float | None:
    """ours / reference, or None when either side is missing or the reference is not positive."""
    if ours is None or reference is None or not reference > 0 or math.isnan(ours):
        return None
    return ours / reference


def tokens_per_second(ms_per_token: float | None) -> float | None:
    return None if ms_per_token is None or not ms_per_token > 0 else 1000.0 / ms_per_token


def median_by_key(pairs: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """[(key, value), ...] -> [(key, median of its values)] sorted by key (e.g. decode ms per context length)."""
    groups: dict[int, list[float]] = {}
    for key, value in pairs:
        groups.setdefault(int(key), []).append(float(value))
    return [(k, percentile(v, 50)) for k, v in sorted(groups.items())]


# ----------------------------------------------------------------------------- roofline
DTYPE_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "int64": 64, "int32": 32,
              "int16": 16, "uint16": 16, "int8": 8, "uint8": 8, "bool": 8, "int4": 4, "uint4": 4,
              "float8e4m3fn": 8, "float8e5m2": 8, "float4e2m1": 4}


def tensor_bytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes a dense tensor of `shape` and `dtype` (a name in DTYPE_BITS) occupies; 4-bit types pack two a byte."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}")
    return math.ceil(math.prod(int(d) for d in shape) * DTYPE_BITS[dtype] / 8)


def decode_bytes_per_token(weight_bytes: int, embedding_row_bytes: int, kv_bytes: int = 0) -> int:
    """Bytes one batch-1 decode step must read: all decoder weights, one embedding row, the KV cache."""
    return int(weight_bytes) + int(embedding_row_bytes) + int(kv_bytes)


def floor_ms(nbytes: float, bandwidth_bytes_per_s: float) -> float | None:
    """Milliseconds to stream `nbytes` at `bandwidth_bytes_per_s`; None without a bandwidth."""
    if not bandwidth_bytes_per_s or bandwidth_bytes_per_s <= 0:
        return None
    return nbytes / bandwidth_bytes_per_s * 1e3


def bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes per second of moving `nbytes` in `seconds` (inf for a zero-time measurement)."""
    return math.inf if seconds <= 0 else nbytes / seconds
