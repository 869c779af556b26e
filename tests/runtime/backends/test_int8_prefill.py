"""`--int8-prefill` (runtime/backends/int8_prefill.py): a w4a16 decoder's prompts on int8 copies of its 4-bit weights."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.runtime.backends.options import BackendOptions
from edgevl.runtime.backends.int8_prefill import PrefillSplitRunner
from edgevl.runtime.embeddings import dequantize_rows


def dequantize_4bit(packed, scales, zero_points, k, n, block):
    """MatMulNBits' 4-bit weights as float32 [K, N], in the flat layout its node inputs have."""
    blocks = -(-k // block)
    zero = None if zero_points is None else zero_points.reshape(n, -1)
    return dequantize_rows(packed, scales.reshape(n, blocks), zero, 4, k).T


def per_channel_int8(w):
    """The readable definition requantize must equal: symmetric int8 per column of w [K, N], w ~= q * scale."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _matmul_nbits(k, n, block, packed, scales, zero_points):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,block,with_zero_points", [(64, 16, True), (96, 32, False), (80, 32, True)])
def test_dequantized_weights_are_what_onnxruntimes_matmulnbits_multiplies(k, block, with_zero_points):
    rng, n = np.random.default_rng(k), 24
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) + 0.1) * 0.05
    zero_points = rng.integers(0, 256, n * -(-blocks // 2), dtype=np.uint8) if with_zero_points else None
    a = rng.standard_normal((5, k)).astype(np.float32)
    expected = _matmul_nbits(k, n, block, packed, scales, zero_points).run(None, {"A": a})[0]
    w = dequantize_4bit(packed, scales, zero_points, k, n, block)
    assert w.shape == (k, n)
    np.testing.assert_allclose(a @ w, expected, rtol=1e-5, atol=1e-5)


def test_per_channel_int8_rounds_each_column_to_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 10)).astype(np.float32) * np.linspace(0.01, 3, 10, dtype=np.float32)
    w[:, 3] = 0.0                                                        # an all-zero column keeps a usable scale
    q, scale = per_channel_int8(w)
    assert q.dtype == np.int8 and scale.shape == (10,) and np.abs(q).max() <= 127
    assert (np.abs(q * scale - w) <= scale / 2 + 1e-7).all() and scale[3] == 1.0


@pytest.fixture(scope="module")
def w4a16(tiny_artifact, tmp_path_factory):
    from edgevl.calibrate.options import QuantizeOptions
    from edgevl.calibrate.quantize import quantize as run_quantize
    folder = tmp_path_factory.mktemp("int8-prefill") / "w4a16"
    cache = folder.parent / "quantize-cache"          # what quantize leaves there: see the test of it below
    cache.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGEVL_CACHE", str(cache))
        run_quantize(tiny_artifact, folder, QuantizeOptions("w4a16", samples=4, eval_samples=2, new_tokens=4,
                                                            calib_steps=3, progress=False, block_size=32, force=True),
                     None, log=lambda msg: None, table=lambda text: None)
    return folder


def test_prompts_go_to_the_int8_session_and_decode_steps_to_the_4bit_one(w4a16, photos):
    from edgevl.runtime.pipeline import Pipeline
    plain = Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=False))
    split = Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=True))
    assert isinstance(split.decoder, PrefillSplitRunner) and not isinstance(plain.decoder, PrefillSplitRunner)
    calls = []
    for side in ("prefill", "decode"):
        runner = getattr(split.decoder, side)
        infer = runner.infer
        runner.infer = lambda feed, bindings=None, infer=infer, side=side: (calls.append(side), infer(feed, bindings))[1]
    ask = dict(images=[photos["coffee"]], max_new_tokens=6, do_sample=False)
    got, expected = split.generate("What is this?", **ask), plain.generate("What is this?", **ask)
    assert calls == ["prefill"] + ["decode"] * (len(got.token_ids) - 1)
    assert got.token_ids[0] == expected.token_ids[0]    # later tokens may part: the KV is the int8 prefill's


def _kl(p_logits, q_logits) -> float:
    p, q = (np.exp(x - x.max()) / np.exp(x - x.max()).sum() for x in (p_logits, q_logits))
    return float((p * (np.log(p) - np.log(q))).sum())


def test_the_int8_prefill_is_as_far_from_fp32_as_the_4bit_graph_is(w4a16, tiny_artifact):
    """Against the fp32 export's prefill logits, the int8 prefill (4-bit weights rounded once more, activations
    quantized per call) stays as close as the 4-bit graph itself: its extra rounding is small next to 4 bits'."""
    from edgevl.runtime.pipeline import Pipeline
    pipes = {"fp32": Pipeline.load(tiny_artifact, backend="ort-cpu"),
             "w4a16": Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=False)),
             "split": Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=True))}
    prompt = _text_prompt(pipes["fp32"], "Describe a cat in one long sentence, please. " * 8)
    logits = {}
    for name, pipe in pipes.items():
        logits[name], cache = _prefill(pipe, prompt)
        logits[name] = logits[name][0]
        assert cache.lengths.tolist() == [prompt[0].shape[1]]            # the cache the decode session reads
    plain, split = _kl(logits["fp32"], logits["w4a16"]), _kl(logits["fp32"], logits["split"])
    assert split <= 1.25 * plain + 1e-3, (split, plain)
    assert not np.array_equal(logits["split"], logits["w4a16"])          # the int8 session did compute it


def test_the_batch_scheduler_serves_with_int8_prefill(w4a16):
    from edgevl.serve.scheduler.batching import BatchScheduler
    from edgevl.serve.scheduler.jobs import Job
    from edgevl.runtime.pipeline import Pipeline
    pipe = Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=True))
    scheduler = BatchScheduler(pipe, max_batch=2, max_queue=2, prefill_chunk=8, start=False)
    jobs = [scheduler.submit(Job(lambda t=t: pipe.prepare(t), pipe.decoding(5, do_sample=False)))
            for t in ("Describe a cat.", "Hi")]
    scheduler.run_until_idle()
    assert all(1 <= len(j.future.result(timeout=0).token_ids) <= 5 for j in jobs)


def test_graphs_without_4bit_matmuls_run_as_exported(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    notes = []
    pipe = Pipeline.load(tiny_artifact, backend="ort-cpu", options=BackendOptions(int8_prefill=True, log=notes.append))
    assert not isinstance(pipe.decoder, PrefillSplitRunner)
    assert any("no 4-bit matmuls" in n for n in notes)


@pytest.mark.parametrize("k,block,with_zero_points", [(64, 16, True), (96, 32, False), (80, 32, True), (256, 128, True)])
def test_requantize_is_per_channel_int8_of_the_dequantized_weights_bit_for_bit(k, block, with_zero_points):
    """The load-time path (requantize) and the readable definition (per_channel_int8 over dequantize_4bit) agree
    exactly, padding of a last partial block included."""
    from edgevl.runtime.backends.int8_prefill import requantize
    rng, n = np.random.default_rng(k + block), 72
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) + 0.1) * 0.05
    zero_points = rng.integers(0, 256, n * -(-blocks // 2), dtype=np.uint8) if with_zero_points else None
    q, scale = requantize(packed, scales, zero_points, k, n, block)
    q_ref, scale_ref = per_channel_int8(dequantize_4bit(packed, scales, zero_points, k, n, block))
    assert q.shape == (k, n) and q.dtype == np.int8 and q.flags.c_contiguous
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(q, q_ref)


def test_quantize_measures_the_int8_prefill_and_writes_its_choice_into_the_manifest(w4a16):
    import json
    from edgevl.artifact.folder import load_artifact
    decoder = load_artifact(w4a16).manifest.graph("decoder")
    report = json.loads((w4a16 / "quant_report.json").read_text())["graphs"]["decoder"]
    trial = next(t for t in report["trials"] if t["levels"].get("prefill") == "int8")
    plain = next(t for t in report["trials"] if t.get("chosen"))
    assert trial["kl_mean"] != plain["kl_mean"]          # the int8 session did run the calibration prompts
    assert "int8 prefill" in report["details"]["notes"]["prefill"]
    assert decoder.int8_prefill == ("int8 prefill kept" in report["details"]["notes"]["prefill"])
    assert decoder.int8_prefill     # on the tiny model it is measured well within the budget


@pytest.mark.parametrize("flag,cpu,split", [(None, True, True), (None, False, False), (False, True, False),
                                            (True, False, True)])
def test_the_default_follows_the_manifest_and_the_cpu_and_the_flag_overrides_both(w4a16, monkeypatch, flag, cpu,
                                                                                     split):
    from edgevl.runtime.backends import int8_prefill
    from edgevl.runtime.pipeline import Pipeline
    monkeypatch.setattr(int8_prefill, "int8_dot_products", lambda: cpu)
    notes = []
    pipe = Pipeline.load(w4a16, backend="ort-cpu", options=BackendOptions(int8_prefill=flag, log=notes.append))
    assert isinstance(pipe.decoder, PrefillSplitRunner) == split
    if flag is None:
        assert any(("int8 copies" if cpu else "no AVX-512 VNNI") in n for n in notes), notes


def test_by_default_it_stays_off_where_the_copy_would_take_over_a_quarter_of_the_memory(w4a16):
    import onnx
    from edgevl.runtime.backends.int8_prefill import by_default, candidates
    nodes = candidates(onnx.load(str(w4a16 / "decoder.onnx"), load_external_data=False), 1 << 30)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    extra = sum(a["K"] * a["N"] for a in attrs)                    # one byte per weight
    assert by_default(nodes, cpu_has_int8_dot=True, available=4 * extra) == ""
    assert "more than 1/4 of the" in by_default(nodes, cpu_has_int8_dot=True, available=4 * extra - 1)
    assert by_default(nodes, cpu_has_int8_dot=True, available=None) == ""          # unknown memory: no limit
    assert "no AVX-512 VNNI" in by_default(nodes, cpu_has_int8_dot=False, available=None)


def test_int8_dot_products_reads_the_cpu_flags(tmp_path):
    from edgevl.runtime.backends.int8_prefill import int8_dot_products
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert int8_dot_products(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx_vnni_int8\n")   # not AVX-VNNI itself
    assert not int8_dot_products(str(cpuinfo))
    assert not int8_dot_products(str(tmp_path / "missing"))


def test_the_bench_report_says_which_edgevl_rows_ran_their_prompts_on_int8_copies(w4a16, tmp_path, monkeypatch):
    import json

    from edgevl.cli.bench import run as cmd_bench
    from edgevl.runtime.backends import int8_prefill
    from tests.bench.test_suite import bench_args
    monkeypatch.setattr(int8_prefill, "int8_dot_products", lambda: True)
    out = {}
    for flag in ("--int8-prefill", "--no-int8-prefill"):
        args = bench_args(w4a16, "--image-size", "none", "--new-tokens", "2", "--runs", "1", "--warmup", "0", flag,
                          "--bandwidth-mib", "8", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md",
                          "--no-progress")
        assert cmd_bench(args) == 0
        row, = json.loads((tmp_path / "r.json").read_text())["rows"]
        out[flag] = (row["edgevl"]["runners"], (tmp_path / "r.md").read_text())
    assert "decoder+int8-prefill" in out["--int8-prefill"][0] and "| ort-cpu, int8 prefill |" in out["--int8-prefill"][1]
    assert "int8-prefill" not in out["--no-int8-prefill"][0] and "int8 prefill |" not in out["--no-int8-prefill"][1]


def test_meminfo_and_cpu_flags_read_procs_files_and_say_none_where_they_are_missing(tmp_path):
    from edgevl.runtime.backends.probe import cpu_flags, meminfo_bytes
    (tmp_path / "meminfo").write_text("MemTotal:       24684544 kB\nMemAvailable:   23000000 kB\n")
    assert meminfo_bytes("MemAvailable", str(tmp_path / "meminfo")) == 23000000 * 1024
    assert meminfo_bytes("MemTotal", str(tmp_path / "missing")) is None
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def _text_prompt(pipe, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeds [1, T, H], positions) of a text prompt, as `pipe` makes them."""
    ids = pipe.prepare(text).input_ids
    positions, _ = pipe.positions(ids[None], np.ones((1, len(ids)), np.int64), [], [])
    return pipe.embed(ids, [], [])[None], positions


def _prefill(pipe, prompt) -> tuple[np.ndarray, object]:
    """(logits, the KV cache it wrote) of one prefill of `prompt` on pipe's decoder."""
    from edgevl.artifact import names
    from edgevl.runtime.generate import decoder_step
    embeds, positions = prompt
    cache = pipe.new_cache(1)
    outputs = decoder_step(pipe.decoder, cache, embeds, positions, np.array([embeds.shape[1]]))
    return np.asarray(outputs[names.LOGITS]), cache


def _prefill_logits(pipe) -> np.ndarray:
    return _prefill(pipe, _text_prompt(pipe, "Describe a cat in one long sentence, please. " * 4))[0]


def test_later_loads_read_the_kept_int8_copies_instead_of_making_them(w4a16, tmp_path, monkeypatch):
    from edgevl.runtime.backends import int8_prefill
    from edgevl.runtime.pipeline import Pipeline
    notes = []
    opts = BackendOptions(int8_prefill=True, cache_dir=tmp_path, log=notes.append)
    first = _prefill_logits(Pipeline.load(w4a16, backend="ort-cpu", options=opts))
    kept = list((tmp_path / "int8-prefill").iterdir())
    assert len(kept) == 2 and any("made once and kept in" in n for n in notes)

    def remade(*args):
        raise AssertionError("the int8 copies were made again")
    monkeypatch.setattr(int8_prefill, "requantize", remade)
    notes.clear()
    again = _prefill_logits(Pipeline.load(w4a16, backend="ort-cpu", options=opts))
    assert any("int8 copies read from" in n for n in notes)
    np.testing.assert_array_equal(again, first)
    monkeypatch.undo()
    fresh = _prefill_logits(Pipeline.load(w4a16, backend="ort-cpu",
                                          options=BackendOptions(int8_prefill=True, keep_int8_copies=False)))
    np.testing.assert_array_equal(fresh, first)                       # the kept copies are the ones made


def test_the_kept_copies_name_changes_with_the_graph_s_files(w4a16, tmp_path):
    import os
    import shutil

    from edgevl.artifact.folder import load_artifact
    from edgevl.runtime.backends.int8_prefill import kept_copies
    graph = load_artifact(w4a16).graph("decoder")
    name = kept_copies(graph, tmp_path)
    assert name.parent == tmp_path / "int8-prefill" and name == kept_copies(graph, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(w4a16, copy)                                     # the same files, times kept
    assert kept_copies(load_artifact(copy).graph("decoder"), tmp_path) == name
    data = copy / graph.spec.files[0]
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))   # changed under its manifest
    assert kept_copies(load_artifact(copy, verify=False).graph("decoder"), tmp_path) != name


def test_quantize_keeps_no_int8_copies_of_its_candidates(w4a16):
    assert not (w4a16.parent / "quantize-cache" / "int8-prefill").exists()
