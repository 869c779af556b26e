"""ort-cpu's grouped decode steps (runtime/backends/grouped_decode.py): the rewritten graph computes what the exported one
does, writes the cache in place, and only takes the grouped path where it applies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from edgevl.artifact import names
from edgevl.runtime.backends import grouped_decode


def _attention_graph(heads: int, kv: int, dim: int, hidden: int = 32, seed: int = 0) -> onnx.ModelProto:
    """inputs_embeds -> q/k/v projections -> GroupQueryAttention over past_key_values.0.* -> out, present.0.*"""
    rng = np.random.default_rng(seed)
    weights = {n: numpy_helper.from_array((rng.standard_normal((hidden, w)) * 0.3).astype(np.float32), n)
               for n, w in (("wq", heads * dim), ("wk", kv * dim), ("wv", kv * dim))}
    past_k, past_v = names.kv_names(1)[0][0], names.kv_names(1)[0][0].replace(".key", ".value")
    present_k, present_v = names.present_for(past_k), names.present_for(past_v)
    nodes = [h.make_node("MatMul", [names.INPUTS_EMBEDS, w], [w + "_out"]) for w in ("wq", "wk", "wv")]
    nodes.append(h.make_node("GroupQueryAttention", ["wq_out", "wk_out", "wv_out", past_k, past_v, names.SEQLENS_K,
                                                     names.TOTAL_SEQUENCE_LENGTH], ["out", present_k, present_v],
                             domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=dim ** -0.5))
    cache = ["batch", kv, "max_context", dim]
    inputs = [h.make_tensor_value_info(names.INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "seq", hidden]),
              h.make_tensor_value_info(names.SEQLENS_K, TensorProto.INT32, ["batch"]),
              h.make_tensor_value_info(names.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
              h.make_tensor_value_info(past_k, TensorProto.FLOAT, cache),
              h.make_tensor_value_info(past_v, TensorProto.FLOAT, cache)]
    outputs = [h.make_tensor_value_info("out", TensorProto.FLOAT, None),
               h.make_tensor_value_info(present_k, TensorProto.FLOAT, cache),
               h.make_tensor_value_info(present_v, TensorProto.FLOAT, cache)]
    return h.make_model(h.make_graph(nodes, "attention", inputs, outputs, list(weights.values())),
                        opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _step(session, embeds, lengths, cache_k, cache_v, shared: bool = True):
    """One call adding embeds.shape[1] tokens after `lengths` per row; shared: past and present are the buffers."""
    past_k, past_v = names.kv_names(1)[0][0], names.kv_names(1)[0][0].replace(".key", ".value")
    seq = embeds.shape[1]
    feed = {names.INPUTS_EMBEDS: embeds, names.SEQLENS_K: (lengths + seq - 1).astype(np.int32),
            names.TOTAL_SEQUENCE_LENGTH: np.array(int(lengths.max()) + seq, np.int32)}
    binding = session.io_binding()
    binding.bind_output("out")                      # outputs come back in binding order
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for name, buffer in ((past_k, cache_k), (past_v, cache_v)):
        binding.bind_input(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        if shared:
            binding.bind_output(names.present_for(name), "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output(names.present_for(name))
    session.run_with_iobinding(binding)
    return dict(zip(["out", names.present_for(past_k), names.present_for(past_v)],
                    [o.numpy() for o in binding.get_outputs()]))


@pytest.mark.parametrize("heads,kv", [(12, 2), (16, 2), (28, 4), (4, 2)])   # 2B, 3B, 7B, tiny
def test_grouped_decode_steps_equal_the_exported_node_and_write_in_place(heads, kv):
    dim, hidden, prompt, steps = 16, 32, 9, 4
    plain = _attention_graph(heads, kv, dim)
    rewritten = _attention_graph(heads, kv, dim)
    spare = grouped_decode.rewrite(rewritten)
    assert spare == heads // kv - 1 and grouped_decode.spare_positions(plain) == spare
    assert sum(n.op_type == "If" for n in rewritten.graph.node) == 2          # the shared inputs + one layer
    a, b = _session(plain), _session(rewritten)
    rng = np.random.default_rng(1)
    max_context = prompt + steps
    caches = {s: [np.zeros((1, kv, max_context + s, dim), np.float32) for _ in range(2)] for s in (0, spare)}
    lengths = np.array([0])
    for n in (prompt,) + (1,) * steps:
        embeds = rng.standard_normal((1, n, hidden)).astype(np.float32)
        want, got = _step(a, embeds, lengths, *caches[0]), _step(b, embeds, lengths, *caches[spare])
        np.testing.assert_allclose(got["out"], want["out"], rtol=1e-5, atol=1e-5)
        lengths = lengths + n
        for mine, theirs in zip(caches[spare], caches[0]):       # the same rows, in the same buffer
            np.testing.assert_allclose(mine[:, :, :lengths[0]], theirs[:, :, :lengths[0]], rtol=1e-6, atol=1e-6)
    last, key = lengths[0] - 1, caches[spare][0]          # the last step's copies fill the spare positions
    assert np.array_equal(key[:, :, last + 1:], np.repeat(key[:, :, last:last + 1], spare, axis=2))


def test_batches_prefill_and_replayed_pasts_take_the_exported_path():
    """Two rows, a prompt, or a past that present grows from (a replayed calibration feed): the If's plain branch,
    so the outputs are bit-identical to the exported node's; nothing is written past the new tokens."""
    heads, kv, dim, hidden = 12, 2, 16, 32
    plain, rewritten = _attention_graph(heads, kv, dim), _attention_graph(heads, kv, dim)
    spare = grouped_decode.rewrite(rewritten)
    a, b = _session(plain), _session(rewritten)
    rng = np.random.default_rng(2)
    # two rows of different lengths, right-padded, then a decode step of both
    lengths = np.array([5, 3])
    cache_a = [np.zeros((2, kv, 12 + spare, dim), np.float32) for _ in range(2)]
    for buffer in cache_a:
        buffer[:, :, :5] = rng.standard_normal((2, kv, 5, dim))
    cache_b = [c.copy() for c in cache_a]
    embeds = rng.standard_normal((2, 1, hidden)).astype(np.float32)
    want, got = _step(a, embeds, lengths, *cache_a), _step(b, embeds, lengths, *cache_b)
    assert np.array_equal(got["out"], want["out"]) and all(np.array_equal(x, y) for x, y in zip(cache_a, cache_b))
    # one row, a past that present grows from: exactly the exported result
    past = [rng.standard_normal((1, kv, 7, dim)).astype(np.float32) for _ in range(2)]
    embeds = rng.standard_normal((1, 1, hidden)).astype(np.float32)
    want = _step(a, embeds, np.array([7]), *[p.copy() for p in past], shared=False)
    got = _step(b, embeds, np.array([7]), *[p.copy() for p in past], shared=False)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_nothing_is_rewritten_without_grouped_heads():
    model = _attention_graph(4, 4, 16)
    assert grouped_decode.spare_positions(model) == 0 and grouped_decode.rewrite(model) == 0
    assert not any(n.op_type == "If" for n in model.graph.node)


def test_ort_cpu_decoders_get_the_rewrite_and_spare_cache_positions(pipeline):
    """The backend table rewrites in-place decoders on ort-cpu (the tiny model: 4 query heads over 2) and the
    runtime's cache keeps the spare position; the graph file on disk is unchanged."""
    decoder = pipeline.decoder
    assert decoder.kv_spare_positions == 1
    cache = pipeline.new_cache(1)
    assert next(iter(cache.buffers.values())).shape[2] == pipeline.max_context + 1
    on_disk = onnx.load(str(pipeline.artifact.graph_path("decoder")), load_external_data=False)
    assert not any(n.op_type == "If" for n in on_disk.graph.node)


def test_a_transformed_graph_reads_its_external_weights_from_the_artifact_folder(tmp_path):
    """SessionFromOnnx(transform=...) on a graph whose weights live in a .data file: the session is made from the
    edited bytes with the weights memory-mapped from the file (pages dropped after loading), and computes what
    the untransformed graph does."""
    from edgevl.runtime.backends.ort_session import SessionFromOnnx
    heads, kv, dim, hidden = 12, 2, 16, 32
    path = tmp_path / "decoder.onnx"
    onnx.save(_attention_graph(heads, kv, dim, hidden), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="decoder.onnx.data", size_threshold=0)
    plain, edited = SessionFromOnnx(path)(), SessionFromOnnx(path, transform=grouped_decode.rewrite)()
    assert not any(n.op_type == "If" for n in onnx.load(str(path), load_external_data=False).graph.node)
    rng = np.random.default_rng(3)
    caches = {s: [np.zeros((1, kv, 8 + s, dim), np.float32) for _ in range(2)] for s in (0, heads // kv - 1)}
    lengths = np.array([0])
    for n in (5, 1, 1):
        embeds = rng.standard_normal((1, n, hidden)).astype(np.float32)
        want = _step(plain, embeds, lengths, *caches[0])
        got = _step(edited, embeds, lengths, *caches[heads // kv - 1])
        np.testing.assert_allclose(got["out"], want["out"], rtol=1e-5, atol=1e-5)
        lengths = lengths + n
