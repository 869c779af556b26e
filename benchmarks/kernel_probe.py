"""onnxruntime CPU kernels on their own, with weights and caches too large for the caches (as in a real step).

    python benchmarks/kernel_probe.py matmul      # 4-bit MatMulNBits vs int8 DynamicQuantizeMatMul, 1..289 rows
    python benchmarks/kernel_probe.py attention   # one decode step's attention over a 16k fp32 cache, 28 layers
    python benchmarks/kernel_probe.py blocks      # 4-bit MatMulNBits' block size: 1 row and 289 rows
    python benchmarks/kernel_probe.py dtypes      # which float types the CPU EP's MatMul runs, and how fast

What the numbers answer (the notes on issues 11, 13 and 15 quote them):
  matmul     how a weight-only 4-bit matmul's cost grows with the rows it multiplies (1 row: a decode step;
             8: eight batched clients; 289: a prompt's prefill), against int8 weights at twice the bytes.
             40 distinct [1536, 8960] matrices (the 2B's MLP shape) so the weights stream from memory.
  attention  the formulations of a grouped decode step (6 query heads per KV head, 2 KV heads, head_dim 128)
             that onnxruntime's ops allow, against reading the cache once: GroupQueryAttention itself, and
             standard MatMul / Softmax with the keys as the streamed operand and the values as is or stored
             transposed ([D, T]).
  blocks     what `edgevl quantize --block-size` buys: the same 40 matrices as 4-bit blocks of 32..512 (with
             zero points, int8 compute as the w4a16 recipe builds them), at 1 row and at 289 rows.
  dtypes     whether onnxruntime's CPU EP has a MatMul for bfloat16 and float16 (a bf16 recipe needs one) and
             the rate of those it has, on the vision MLP's [1024, 1280] x [1280, 5120].

Each cell is the median of --reps runs after 2 warm-ups, --threads intra-op threads; "floor" is the bytes
read over --bandwidth (default 43 GB/s: the one-stream figure `edgevl bench` measured on the AMD EPYC VM
these notes name; its probe now also reads four streams per thread and gets ~50 GB/s there).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

K, N, MATRICES = 1536, 8960, 40
LAYERS, KV_HEADS, GROUP, HEAD_DIM = 28, 2, 6, 128


def session(graph, threads: int):
    import onnxruntime as ort
    from onnx import helper
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(sess, feed: dict, reps: int) -> float:
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def matmul_graph(kind: str, rng, block: int = 128, matrices: int = MATRICES):
    """MATRICES independent matmuls of one input A [M, K]: 4-bit MatMulNBits (int8 compute) or int8 weights."""
    from onnx import TensorProto, helper, numpy_helper
    nodes, weights, outputs = [], [], []
    for i in range(matrices):
        if kind == "int4":
            blocks = K // block
            weights += [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, block // 2), dtype=np.uint8), f"B{i}"),
                        numpy_helper.from_array(rng.random(N * blocks, dtype=np.float32) * 0.01, f"S{i}"),
                        numpy_helper.from_array(rng.integers(0, 256, N * ((blocks + 1) // 2), dtype=np.uint8), f"Z{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}", f"Z{i}"], [f"Y{i}"],
                                          domain="com.microsoft", K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        else:
            weights += [numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), f"W{i}"),
                        numpy_helper.from_array(rng.random(N, dtype=np.float32) * 0.01, f"S{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", ["A", f"W{i}", f"S{i}"], [f"Y{i}"],
                                          domain="com.microsoft"))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["M", N]))
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])]
    return helper.make_graph(nodes, kind, inputs, outputs, weights)


def probe_matmul(args) -> None:
    rng = np.random.default_rng(0)
    rows = [1, 2, 4, 8, 16, 289]
    bytes_per_weight = {"int4": 0.5 + 4 / 128 + 0.5 / 128, "int8": 1.0}
    print(f"{MATRICES} matrices [{K}, {N}], {args.threads} threads; ms per call at M rows (x the 1-row int4 time)")
    base = None
    for kind in ("int4", "int8"):
        sess = session(matmul_graph(kind, rng), args.threads)
        cells = [median_ms(sess, {"A": rng.standard_normal((m, K)).astype(np.float32)}, args.reps) for m in rows]
        base = base or cells[0]
        floor = MATRICES * K * N * bytes_per_weight[kind] / args.bandwidth * 1e3
        print(f"  {kind} (floor {floor:.2f} ms): " + ", ".join(f"M={m} {c:.2f} ({c / base:.2f}x)"
                                                              for m, c in zip(rows, cells)), flush=True)


def probe_blocks(args) -> None:
    rng = np.random.default_rng(0)
    print(f"{MATRICES} matrices [{K}, {N}] as 4-bit MatMulNBits (zero points, accuracy_level 4), {args.threads} "
          f"threads; ms per call, GB/s of weights read at 1 row, GFLOP/s at 289 rows")
    for block in (32, 64, 128, 256, 512):
        sess = session(matmul_graph("int4", rng, block), args.threads)
        one = median_ms(sess, {"A": rng.standard_normal((1, K)).astype(np.float32)}, args.reps)
        many = median_ms(sess, {"A": rng.standard_normal((289, K)).astype(np.float32)}, max(3, args.reps // 5))
        weight_bytes = MATRICES * K * N * (0.5 + 4 / block + 0.5 / block)
        print(f"  block {block:>3}: M=1 {one:.2f} ms ({weight_bytes / one / 1e6:.1f} GB/s), "
              f"M=289 {many:.1f} ms ({MATRICES * 2 * 289 * K * N / many / 1e6:.0f} GFLOP/s)", flush=True)
        del sess


def probe_dtypes(args) -> None:
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    m, k, n = 1024, 1280, 5120
    print(f"onnxruntime CPU MatMul [{m}, {k}] x [{k}, {n}] (weights constant), {args.threads} threads")
    for name, proto, dtype in (("float32", TensorProto.FLOAT, np.float32), ("float16", TensorProto.FLOAT16, np.float16),
                               ("bfloat16", TensorProto.BFLOAT16, None)):
        w = rng.standard_normal((k, n)).astype(np.float32)
        weight = numpy_helper.from_array(w.astype(dtype), "W") if dtype else \
            helper.make_tensor("W", proto, [k, n], (w.view(np.uint32) >> 16).astype(np.uint16).tobytes(), raw=True)
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], name,
                                  [helper.make_tensor_value_info("A", proto, [m, k])],
                                  [helper.make_tensor_value_info("Y", proto, [m, n])], [weight])
        try:
            sess = session(graph, args.threads)
        except Exception as e:     # onnxruntime's NOT_IMPLEMENTED: no kernel for this type on this EP
            print(f"  {name}: no kernel ({str(e).splitlines()[0][:120]})")
            continue
        ms = median_ms(sess, {"A": rng.standard_normal((m, k)).astype(dtype)}, args.reps)
        print(f"  {name}: {ms:.1f} ms ({2 * m * k * n / ms / 1e6:.0f} GFLOP/s)", flush=True)


def attention_graphs(tokens: int):
    """name -> (graph, q shape) for one decode step's attention over LAYERS caches of `tokens` positions."""
    from onnx import TensorProto, helper, numpy_helper
    cache = [KV_HEADS, tokens, HEAD_DIM]

    def build(name, per_layer, q_shape, extra=()):
        nodes, inputs, outputs = [], [helper.make_tensor_value_info("q", TensorProto.FLOAT, q_shape)], []
        for i in range(LAYERS):
            inputs += [helper.make_tensor_value_info(f"k{i}", TensorProto.FLOAT, [1, *cache]),
                       helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, [1, *cache])]
            nodes += per_layer(i)
            outputs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None))
        return helper.make_graph(nodes, name, inputs, outputs, list(extra)), q_shape

    transposed = numpy_helper.from_array(np.array([1, KV_HEADS, HEAD_DIM, tokens], np.int64), "vt_shape")
    return {
        # scores [T, g] = K [T, D] @ q^T [D, g]: the cache is the streamed operand; P @ V packs V first
        "K @ q^T, Softmax, P @ V": build("kq", lambda i: [
            helper.make_node("MatMul", [f"k{i}", "q"], [f"s{i}"]),
            helper.make_node("Transpose", [f"s{i}"], [f"t{i}"], perm=[0, 1, 3, 2]),
            helper.make_node("Softmax", [f"t{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"])], [1, KV_HEADS, HEAD_DIM, GROUP]),
        # the same with V laid out [D, T] (the Reshape reinterprets the buffer as that layout): P^T is packed
        "K @ q^T, Softmax, V^T @ P^T (V stored [D, T])": build("kqvt", lambda i: [
            helper.make_node("MatMul", [f"k{i}", "q"], [f"s{i}"]),
            helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-2),
            helper.make_node("Reshape", [f"v{i}", "vt_shape"], [f"vt{i}"]),
            helper.make_node("MatMul", [f"vt{i}", f"p{i}"], [f"o{i}"])], [1, KV_HEADS, HEAD_DIM, GROUP], [transposed]),
        "K @ q^T alone": build("k", lambda i: [helper.make_node("MatMul", [f"k{i}", "q"], [f"o{i}"])],
                               [1, KV_HEADS, HEAD_DIM, GROUP]),
        "P @ V alone": build("v", lambda i: [helper.make_node("MatMul", ["q", f"v{i}"], [f"o{i}"])],
                             [1, KV_HEADS, GROUP, tokens]),
        "ReduceSum(K) (a pure read of the keys)": build("r", lambda i: [
            helper.make_node("ReduceSum", [f"k{i}"], [f"o{i}"], keepdims=0)], [1]),
    }


def gqa_graph(tokens: int):
    """GroupQueryAttention as the grouped decode step calls it: g query heads as g tokens of each KV head."""
    from onnx import TensorProto, helper
    width = KV_HEADS * HEAD_DIM
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, GROUP, width]),
              helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, GROUP, width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, GROUP, tokens])]
    nodes, outputs = [], []
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"k{i}", TensorProto.FLOAT, [1, KV_HEADS, tokens, HEAD_DIM]),
                   helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, [1, KV_HEADS, tokens, HEAD_DIM])]
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "new", "new", f"k{i}", f"v{i}", "seqlens_k", "total",
                                                              "", "", "", "bias"], [f"o{i}", f"pk{i}", f"pv{i}"],
                                      domain="com.microsoft", num_heads=KV_HEADS, kv_num_heads=KV_HEADS))
        outputs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None))
    return helper.make_graph(nodes, "gqa", inputs, outputs)


def probe_attention(args) -> None:
    rng = np.random.default_rng(0)
    tokens = args.context
    caches = {f"{kv}{i}": rng.standard_normal((1, KV_HEADS, tokens, HEAD_DIM)).astype(np.float32)
              for i in range(LAYERS) for kv in "kv"}
    floor = LAYERS * 2 * KV_HEADS * tokens * HEAD_DIM * 4 / args.bandwidth * 1e3
    print(f"{LAYERS} layers x {KV_HEADS} KV heads x {tokens} positions x {HEAD_DIM} fp32, {GROUP} query heads per KV "
          f"head, {args.threads} threads; reading K and V once: {floor:.1f} ms (K or V alone: {floor / 2:.1f} ms)")
    for name, (graph, q_shape) in attention_graphs(tokens).items():
        feed = {"q": rng.standard_normal(q_shape).astype(np.float32), **caches}
        sess = session(graph, args.threads)
        print(f"  {name}: {median_ms(sess, feed, args.reps):.1f} ms", flush=True)
    # GroupQueryAttention over the same caches; its present outputs are separate buffers here (the runtime binds
    # them to the past ones), so this cell also copies the caches: an upper bound of the in-place step.
    sess = session(gqa_graph(tokens), args.threads)
    feed = {"q": rng.standard_normal((1, GROUP, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "new": rng.standard_normal((1, GROUP, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "seqlens_k": np.array([tokens - 1], np.int32), "total": np.array(tokens, np.int32),
            "bias": np.zeros((1, 1, GROUP, tokens), np.float32), **caches}
    print(f"  GroupQueryAttention, grouped (presents copied, not in place): {median_ms(sess, feed, args.reps):.1f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=["matmul", "attention", "blocks", "dtypes"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=16384, help="attention: cache positions")
    ap.add_argument("--bandwidth", type=float, default=43e9, help="bytes/s for the floors")
    args = ap.parse_args(argv)
    {"matmul": probe_matmul, "attention": probe_attention, "blocks": probe_blocks, "dtypes": probe_dtypes}[args.probe](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
