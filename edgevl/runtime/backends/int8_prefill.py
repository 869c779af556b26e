"""ort-cpu: a w4a16 decoder's prompt calls run on int8 copies of its 4-bit weights.

onnxruntime's CPU `MatMulNBits` multiplies many rows at about half the rate of its per-channel int8 GEMM
(`benchmarks/kernel_probe.py blocks`: ~750 vs ~1500 GFLOP/s on a 2-core EPYC), which makes the prefill of a
w4a16 artifact slower than an int8 one's, while its decode steps (one row) are the faster. So the runner
holds two sessions of the one decoder file: the graph as exported for decode steps, and a prefill graph in
which each 4-bit `MatMulNBits` but the lm_head (it multiplies the last position only) becomes a
`DynamicQuantizeMatMul` over int8 per-column weights requantized from the 4-bit blocks at load (`requantize`:
pure numpy, the symmetric per-column int8 rounding of the dequantized 4-bit weights without their float copy, a few
matrices at a time, each written to a file onnxruntime reads before the next is made: qwen3-vl-2b-l4's 200M
weights in 0.4-0.6 s instead of 2.8 s on a 2-core EPYC). Calls with more than one position per row go to the
prefill session; both bind the same in-place KV buffers, so the cache a prefill writes is the one decode
steps read.

When: `--int8-prefill` / `--no-int8-prefill`; by default where `edgevl quantize` measured it within its
accuracy budget (the decoder's manifest field int8_prefill, calibrate/int4.py), on CPUs with int8 dot products
(where it was measured faster) when the copy takes at most a quarter of the memory available (`by_default`).

Costs: one more byte per weight in memory and a longer load (the requantization, the second session); the
copies are kept on disk (`kept_copies`: one more byte per weight there) so later loads read them instead;
numerics: the int8 copy adds a rounding step below the 4-bit one (per column, 1/127 of its largest value),
and the dynamic activation scale is per call, so a chunked prefill is not bit-identical to a whole one and
the greedy tokens can differ from the plain w4a16 run's. The files on disk stay as exported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from edgevl.artifact import names

OP = "MatMulNBits"
REQUANTIZE_THREADS = min(4, os.cpu_count() or 1)   # each holds one matrix's float copy (2B: 50 MB at most)


_NIBBLES = np.stack([np.arange(256) & 0x0F, np.arange(256) >> 4], axis=1).astype(np.int8).view(np.int16).ravel()


def requantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
               block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit weights (packed [N, blocks, block/2], low nibble first; scales [N * blocks]; zero points
    [N * ceil(blocks/2)] packed the same way, 8 when absent) as symmetric int8 per column: (q int8 [K, N], scale
    float32 [N]), q = rint(w / scale), scale = max|w| / 127 (1 for an all-zero column), w the dequantized
    float32 weights (runtime.embeddings.dequantize_rows). Bit for bit that, without w's float copy: the nibbles
    unpacked by a table into int8, zero points subtracted in int8, each column's peak from its blocks' peaks
    (a positive scale keeps the order), one float pass for the division, an int8 transpose in tiles."""
    blocks = -(-k // block)
    q = np.take(_NIBBLES, packed.reshape(n, -1)).view(np.int8).reshape(n, blocks, block)      # 0..15
    if zero_points is None:
        q -= 8
    else:
        zero = np.take(_NIBBLES, zero_points.reshape(n, -1)).view(np.int8).reshape(n, -1)[:, :blocks]
        q -= zero[:, :, None]                                                                  # -15..15
    q.reshape(n, -1)[:, k:] = 0                     # the last block's padding is not a weight
    s = scales.reshape(n, blocks).astype(np.float32)
    scale = (np.abs(q).max(axis=2).astype(np.float32) * s).max(axis=1) / np.float32(127.0)
    scale[scale == 0] = 1.0
    w = q.astype(np.float32)
    w *= s[:, :, None]
    w /= scale[:, None, None]
    np.rint(w, out=w)                                # |w| <= 127: the column's peak maps to 127
    return _transposed(w.reshape(n, -1)[:, :k].astype(np.int8)), scale


def _transposed(a: np.ndarray, tile: int = 16) -> np.ndarray:
    """a.T contiguous, copied in column tiles: a 6144 x 2048 int8 matrix in 10 ms with tiles of 16 rows, 28 ms
    with 64, 58 ms in numpy's one pass (2-core EPYC, Zen 4)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], tile):
        out[:, i:i + tile] = a[i:i + tile].T
    return out


def _attrs(node) -> dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni")    # x86 int8 dot products (every AMX CPU has avx512_vnni)


def int8_dot_products(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has the int8 dot-product instructions on which the int8 prefill was measured faster than
    onnxruntime's 4-bit prompt kernels (Zen 5's AVX-512 VNNI; kernel_probe.py). Unknown (no /proc/cpuinfo,
    other architectures): False, so the default stays what was measured."""
    from edgevl.runtime.backends.probe import cpu_flags
    return bool(cpu_flags(cpuinfo) & set(INT8_DOT_FLAGS))


MEMORY_SHARE = 4     # by default the int8 copy may take at most a quarter of the memory available at load


def by_default(nodes, cpu_has_int8_dot: bool, available: int | None) -> str:
    """Why the int8 prefill of these candidate nodes stays off by default on a machine ("" when it goes on): a CPU
    without int8 dot products (not where it was measured faster), or an int8 copy (one byte per weight) larger
    than 1/MEMORY_SHARE of the `available` bytes of memory (None: unknown, no limit)."""
    if not cpu_has_int8_dot:
        return "this CPU has no AVX-512 VNNI or AVX-VNNI, on which the int8 prefill was measured faster"
    extra = sum(_attrs(n)["K"] * _attrs(n)["N"] for n in nodes)
    if available is not None and extra * MEMORY_SHARE > available:
        return (f"its int8 copy, {extra / 1e9:.2f} GB, is more than 1/{MEMORY_SHARE} of the {available / 1e9:.1f} "
                f"GB of memory available")
    return ""


def candidates(model, vocab_size: int) -> list:
    """The 4-bit MatMulNBits nodes the prefill graph replaces: all but an lm_head (N = the vocabulary)."""
    return [node for node in model.graph.node if node.op_type == OP and node.domain == "com.microsoft"
            and _attrs(node).get("bits") == 4 and _attrs(node)["N"] != vocab_size]


def prefill_rewrite(folder, vocab_size: int):
    """transform(model) -> (name, array) pairs for SessionFromOnnx: the prefill graph (module docstring) of a
    decoder whose external weights live in `folder`; its new int8 weights are made as they are read, a few
    matrices at a time (SessionFromOnnx writes each to a file before the next)."""
    def transform(model):
        from onnx import helper, numpy_helper
        inits = {t.name: t for t in model.graph.initializer}
        value = lambda name: numpy_helper.to_array(inits[name], base_dir=str(folder)) if name else None  # noqa: E731
        jobs, replaced = [], set()
        for node in candidates(model, vocab_size):
            a, inputs = _attrs(node), list(node.input) + [""] * (6 - len(node.input))
            wq, ws = f"{node.name}/int8_prefill/w", f"{node.name}/int8_prefill/scale"
            jobs.append((wq, ws, inputs[1:4], (a["K"], a["N"], a["block_size"])))
            replaced.update(x for x in inputs[1:4] if x)
            bias = ["", inputs[5]] if inputs[5] else []              # MatMulNBits' input 5, DQMM's 4
            node.CopyFrom(helper.make_node("DynamicQuantizeMatMul", [inputs[0], wq, ws, *bias], list(node.output),
                                           name=node.name, domain="com.microsoft"))
        still_used = {i for n in model.graph.node for i in n.input}
        kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        return _requantized(jobs, value)
    return transform


KEPT_FORMAT = 1          # the int8 copies kept for later loads: bump when requantize's output changes


def kept_copies(graph, root: Path) -> Path:
    """Where the int8 copies of `graph` (a GraphFile) are kept for later loads: under root/int8-prefill, named by
    the graph's digest, its files' sizes and times (a file changed under a manifest that was not re-verified
    gets a new name) and KEPT_FORMAT."""
    stats = {f: (graph.path.parent / f).stat() for f in graph.spec.files}
    stamp = [(f, st.st_size, st.st_mtime_ns) for f, st in stats.items()]
    key = hashlib.sha256(json.dumps([graph.digest, stamp, KEPT_FORMAT]).encode()).hexdigest()[:24]
    return Path(root) / "int8-prefill" / f"{graph.name}-{key}.bin"


def _requantized(jobs, value):
    """(name, array) pairs of each job's int8 weights and scales, in order, REQUANTIZE_THREADS matrices at a
    time (numpy lets go of the GIL); value(name) reads a 4-bit input."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def job(names_, shape):
        return requantize(*[value(x) for x in names_], *shape)

    def done(wq, ws, future):
        q, scale = future.result()
        return (wq, q), (ws, scale)

    with ThreadPoolExecutor(max_workers=REQUANTIZE_THREADS) as pool:
        pending = deque()
        for wq, ws, names_, shape in jobs:
            pending.append((wq, ws, pool.submit(job, names_, shape)))
            if len(pending) == REQUANTIZE_THREADS:
                yield from done(*pending.popleft())
        while pending:
            yield from done(*pending.popleft())


class PrefillSplitRunner:
    """A Runner over two sessions of one decoder: `prefill` for calls with more than one position per row,
    `decode` for the rest (module docstring). Everything else (metadata, buffers, spare KV positions) is the
    decode runner's."""

    def __init__(self, decode, prefill):
        self.decode, self.prefill = decode, prefill
        self.name = f"{decode.name}+int8-prefill"
        self.device, self.device_id = decode.device, decode.device_id
        self.kv_spare_positions, self.static_decode = decode.kv_spare_positions, decode.static_decode

    def input_metadata(self):
        return self.decode.input_metadata()

    def allocate(self, shape, dtype):
        return self.decode.allocate(shape, dtype)

    def activate(self) -> None:
        from edgevl.runtime.backends.runner import activate_all
        activate_all([self.decode, self.prefill], concurrently=False)

    def deactivate(self) -> None:
        self.decode.deactivate()
        self.prefill.deactivate()

    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        many = np.shape(feed[names.INPUTS_EMBEDS])[1] > 1
        return (self.prefill if many else self.decode).infer(feed, bindings)
