"""AWQ (activation-aware weight quantization), the pure math: numpy in, numpy out, no graphs.

For a MatMul y = x @ w (x [rows, K], w [K, N]) and any per-input-channel scale s [K] > 0,

    y = (x / s) @ (w * s[:, None])

exactly in real arithmetic. Quantizing `w * s[:, None]` instead of `w` makes the rows that meet
large activations (large s) relatively larger inside their 4-bit block, so they lose less to
rounding, at the cost of the rows that meet small activations. AWQ (Lin et al., 2023) picks
s = mean|x| ** alpha per channel and searches alpha on calibration activations for the smallest
output error. alpha = 0 is s = 1, i.e. plain round-to-nearest, so the search never does worse
than RTN on the activations it measures.

The block-wise scheme is onnxruntime's MatMulNBits (asymmetric, `block` rows of K per scale,
per output column): per block min' = min(min w, 0), max' = max(max w, 0), scale = (max' - min') / 15,
zero point = round(-min' / scale) clamped to [0, 15], q = clamp(round(w / scale) + zp, 0, 15);
K is zero-padded to a multiple of `block`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rtn_quantize_blockwise(w: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block-wise round-to-nearest of w [K, N] along K.

    Returns (q uint8 [n_blocks, block, N], scales float32 [n_blocks, N], zero_points uint8 [n_blocks, N]);
    K is zero-padded to n_blocks * block (dequantize crops it back).
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n_blocks * block, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(n_blocks, block, n)
    qmax = (1 << bits) - 1
    lo = np.minimum(blocks.min(1), 0.0)
    hi = np.maximum(blocks.max(1), 0.0)
    scales = ((hi - lo) / qmax).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    zero = np.where(scales == 0, 0.0, np.clip(np.round(-lo / safe), 0, qmax))
    inv = np.where(scales == 0, 0.0, 1.0 / safe)
    q = np.clip(np.round(blocks * inv[:, None, :] + zero[:, None, :]), 0, qmax)
    return q.astype(np.uint8), scales, zero.astype(np.uint8)


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """The float weight [K, N] that (q, scales, zero_points) stand for."""
    w = (q.astype(np.float32) - zero_points[:, None, :].astype(np.float32)) * scales[:, None, :]
    return w.reshape(-1, w.shape[-1])[:k]


def fake_quantize(w: np.ndarray, block: int, bits: int = 4) -> np.ndarray:
    """deq(q(w)): what the quantized MatMul multiplies by."""
    return dequantize_blockwise(*rtn_quantize_blockwise(w, block, bits), k=w.shape[0])


@dataclass
class AwqResult:
    scales: np.ndarray        # s [K] float32; the MatMul becomes (x / s) @ q(w * s[:, None])
    alpha: float              # the chosen exponent (0 = plain RTN, s = 1)
    loss: float               # ||x @ w - (x / s) @ deq(q(w * s))||^2 / ||x @ w||^2 on the sample
    rtn_loss: float           # the same at alpha = 0


def awq_scales(act_mean: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x| ** alpha, normalised so that max(s) * min(s) = 1 (the scales straddle 1)."""
    a = np.asarray(act_mean, np.float64)
    a = np.maximum(a, max(1e-4 * float(a.max(initial=0.0)), 1e-12))     # dead channels: no division by 0
    s = a ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def awq_search(w: np.ndarray, x: np.ndarray, act_mean: np.ndarray, block: int, grid: int = 20,
               bits: int = 4) -> AwqResult:
    """The alpha in {0, 1/grid, ..., 1} whose scales minimise the output error of 4-bit w on the rows x.

    w [K, N] (a group of MatMuls reading the same x may pass their weights concatenated along N),
    x [rows, K] a sample of that MatMul's activations, act_mean [K] mean |x| over all calibration rows.
    Ties keep the smaller alpha, so alpha = 0 (RTN) wins unless scaling measurably helps.
    """
    w = np.asarray(w, np.float32)
    x = np.asarray(x, np.float32)
    ref = x @ w
    norm = max(float(np.square(ref, dtype=np.float64).sum()), 1e-30)
    best = None
    rtn_loss = None
    for i in range(grid + 1):
        alpha = i / grid
        s = awq_scales(act_mean, alpha) if i else np.ones(w.shape[0], np.float32)
        out = (x / s) @ fake_quantize(w * s[:, None], block, bits)
        loss = float(np.square(out - ref, dtype=np.float64).sum()) / norm
        if i == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    return AwqResult(s, alpha, loss, rtn_loss)


class RowStats:
    """Streaming statistics of one activation tensor seen as rows [*, K]: mean |x| per channel over every
    row, and a uniform random sample of at most `max_rows` rows (seeded; each row gets a random key and the
    smallest keys stay), so memory is bounded whatever the number of feeds."""

    def __init__(self, max_rows: int = 512, seed: int = 0):
        self.max_rows, self.rng = max_rows, np.random.default_rng(seed)
        self.abs_sum, self.count = None, 0
        self.rows, self.keys = None, None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
        if not len(x):
            return
        total = np.abs(x, dtype=np.float64).sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += len(x)
        keys = self.rng.random(len(x))
        rows, keys = (x, keys) if self.rows is None else (np.concatenate([self.rows, x]),
                                                          np.concatenate([self.keys, keys]))
        if len(rows) > self.max_rows:
            keep = np.argpartition(keys, self.max_rows)[:self.max_rows]
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = np.ascontiguousarray(rows), keys

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).astype(np.float32)
