"""`edgevl quantize`: every recipe makes an artifact the normal runtime runs, measured and gated.

The tiny random model is a harsh quantization target (random weights, logit margins of a few
tenths), so the w4a16 artifact here fails the default gate and is written with force=True; the
gate itself is tested with a deliberately broken quantization.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from edgevl.artifact import names
from edgevl.artifact.onnx_files import save_graph
from edgevl.calibrate import data, passes, report
from edgevl.calibrate import graph_edit as graphs
from edgevl.calibrate.options import QuantizeOptions
from edgevl.calibrate.quantize import REPORT
from edgevl.calibrate.quantize import quantize as run_quantize
from edgevl.cli import main
from edgevl.cli.quantize import add_parser as add_quantize_parser
from edgevl.errors import EdgevlError

SMALL = {"samples": 4, "eval_samples": 2, "new_tokens": 4, "calib_steps": 3, "progress": False}


def quantize(src, out, recipe, backend=None, **options):
    """The library entry point with the small test sizes, quiet."""
    return run_quantize(src, out, QuantizeOptions(recipe, **{**SMALL, **options}), backend,
                        log=lambda msg: None, table=lambda text: None)


@pytest.fixture(scope="module")
def quantized(tiny_artifact, tmp_path_factory):
    """recipe -> (artifact folder, report) for the three recipes, built once."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for recipe, extra in (("fp16", {}), ("int8", {"max_drop": 0.15, "activations": "static"}),
                          ("w4a16", {"block_size": 32, "force": True})):
        folder = root / recipe
        out[recipe] = (folder, quantize(tiny_artifact, folder, recipe, **extra))
    return out


@pytest.mark.parametrize("recipe", ["fp16", "int8", "w4a16"])
def test_recipe_makes_an_artifact_the_runtime_runs(quantized, tiny_artifact, photos, recipe):
    from edgevl.artifact import load_artifact
    from edgevl.runtime.pipeline import Pipeline

    folder, rep = quantized[recipe]
    result = Pipeline.load(folder).generate("What is this?", images=[photos["coffee"]], max_new_tokens=5,
                                            do_sample=False)
    assert 1 <= len(result.token_ids) <= 5
    art, src = load_artifact(folder), load_artifact(tiny_artifact)
    q = art.manifest.quantization
    assert q.recipe == recipe and q.calibration["samples"] == 4 and len(q.calibration["digest"]) == 64
    assert set(q.graphs) == {"vision", "decoder"} and q.report == REPORT and q.passed is not None
    side = set(src.manifest.files) - set(src.manifest.embeddings.files)
    assert side | {REPORT} | set(art.manifest.embeddings.files) == set(art.manifest.files)   # side files copied
    for graph in ("vision", "decoder"):
        onnx.checker.check_model(str(art.graph_path(graph)), full_check=True)
    decoder = onnx.load(str(art.graph_path("decoder")))
    assert art.manifest.graph("decoder").custom_ops == src.manifest.graph("decoder").custom_ops == ("edgevl.MRoPE",)
    assert sum(n.op_type == "MRoPE" and n.domain == "edgevl" for n in decoder.graph.node) == 1   # once per call
    assert [f.name for f in decoder.functions] == ["MRoPE"]                        # the function body is intact
    saved = json.loads((folder / REPORT).read_text())
    assert saved["recipe"] == recipe and saved["failed"] == rep["failed"]


@pytest.fixture(scope="module")
def held_out(pipeline, tmp_path_factory):
    """The held-out samples the quantize runs above measured on (the same source and seeded split as SMALL asks
    for), and the FP32 pipeline's runs on them recorded again: every graph feed with its vision embeddings or
    decoder logits."""
    opts = QuantizeOptions("fp16", **SMALL)
    pool, _ = data.load_samples(opts.calib, opts.samples + opts.eval_samples, opts.seed)
    _, eval_set = data.split_samples(pool, opts.samples, opts.eval_samples, opts.seed)
    store = data.FeedStore(tmp_path_factory.mktemp("held-out"))
    tokens = data.capture(pipeline, eval_set, store, opts.new_tokens)
    return eval_set, store, tokens


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _kl(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(q)) per row, in nats."""
    lp, lq = _log_softmax(ref), _log_softmax(q)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _measured(pipe, store) -> dict:
    """What the report should say for `pipe`'s graphs, recomputed here from the recorded FP32 outputs: the mean
    cosine of its image embeddings, and the teacher-forced top-1 agreement and KL of its decoder's logits."""
    cosines = []
    for path in store.files(names.VISION):
        feed, ref = data.FeedStore.load(path)
        dtype = pipe.vision.input_metadata()[names.PIXEL_VALUES].dtype
        out = pipe.vision.infer({**feed, names.PIXEL_VALUES: feed[names.PIXEL_VALUES].astype(dtype)})
        cosines.append(_row_cosines(out[names.IMAGE_EMBEDS], ref[names.IMAGE_EMBEDS]).mean())
    agree, kls = [], []
    for sequence in store.decoder_sequences():
        for (_, ref), logits in zip(sequence, report.decoder_logits(pipe.decoder, sequence)):
            agree.extend(np.argmax(ref, -1) == np.argmax(logits, -1))
            kls.extend(_kl(ref, logits))
    return {"images": len(cosines), "cosine_mean": float(np.mean(cosines)), "positions": len(agree),
            "top1_agreement": float(np.mean(agree)), "kl_mean": float(np.mean(kls))}


def _prefix_agreement(ref: list[int], q: list[int]) -> float:
    same = 0
    while same < min(len(ref), len(q)) and ref[same] == q[same]:
        same += 1
    return same / len(ref)


def test_report_numbers_come_from_real_runs(quantized, held_out, pipeline):
    """Every quality number of every report is recomputed here from runs of its artifact on the same held-out
    samples against the FP32 pipeline's recorded outputs (which the FP32 graphs reproduce exactly); a deliberately
    broken candidate (the decoder's logits reversed) scores what a broken one must."""
    from edgevl.runtime.pipeline import Pipeline
    eval_set, store, fp32_tokens = held_out
    exact = _measured(pipeline, store)                        # the recording is the FP32 graphs' own output
    assert exact["images"] >= 1 and exact["positions"] == len(eval_set) * SMALL["new_tokens"]
    assert exact["cosine_mean"] == pytest.approx(1, abs=1e-9) and exact["top1_agreement"] == 1
    assert exact["kl_mean"] == pytest.approx(0, abs=1e-9)
    for recipe, (folder, rep) in quantized.items():
        quant = Pipeline.load(folder)
        vision, decoder = rep["graphs"]["vision"]["metrics"], rep["graphs"]["decoder"]["metrics"]
        ours = _measured(quant, store)
        assert (vision["images"], decoder["positions"]) == (ours["images"], ours["positions"]), recipe
        assert vision["cosine_mean"] == pytest.approx(ours["cosine_mean"], abs=1e-6), recipe
        assert decoder["top1_agreement"] == pytest.approx(ours["top1_agreement"], abs=1e-9), recipe
        assert decoder["kl_mean"] == pytest.approx(ours["kl_mean"], rel=1e-3, abs=1e-7), recipe
        assert rep["graphs"]["decoder"]["gate"]["drop"] == pytest.approx(1 - ours["top1_agreement"], abs=1e-9)
        tokens = [quant.generate(s.prompt, images=list(s.images), max_new_tokens=SMALL["new_tokens"],
                                 do_sample=False, repetition_penalty=1.0).token_ids for s in eval_set]
        greedy = rep["pipeline"]["greedy"]
        assert greedy["samples"] == len(eval_set) and greedy["new_tokens"] == SMALL["new_tokens"]
        assert greedy["prefix_agreement"] == pytest.approx(
            np.mean([_prefix_agreement(r, q) for r, q in zip(fp32_tokens, tokens)]), abs=1e-9), recipe
        assert greedy["identical_sequences"] == sum(r == q for r, q in zip(fp32_tokens, tokens)), recipe
        for side in ("fp32", "quantized"):
            assert rep["pipeline"]["latency"][side]["decode_ms_per_token"] > 0
        assert rep["graphs"]["vision"]["size_bytes"]["quantized"] < rep["graphs"]["vision"]["size_bytes"]["fp32"]
        assert rep["graphs"]["decoder"]["size_bytes"]["quantized"] < rep["graphs"]["decoder"]["size_bytes"]["fp32"]
    fp16 = quantized["fp16"][1]["graphs"]
    assert fp16["vision"]["metrics"]["cosine_mean"] > 0.9999 and fp16["decoder"]["metrics"]["top1_agreement"] == 1
    assert fp16["decoder"]["ops"]["MRoPE"] == {"fp32": 1}
    assert fp16["decoder"]["ops"]["GroupQueryAttention"] == {"fp16": 2}      # the fused attention, per layer
    assert quantized["fp16"][1]["failed"] == [] and quantized["int8"][1]["failed"] == []
    assert quantized["int8"][1]["graphs"]["decoder"]["details"]["activations"] == "static"   # as asked
    # the scores tell a broken decoder: its logits reversed, the FP32 top-1 becomes the last choice everywhere
    broken = report.score_decoder(_Reversed(pipeline.decoder), store)
    assert broken["top1_agreement"] == 0 and broken["kl_mean"] > 10 * max(
        q[1]["graphs"]["decoder"]["metrics"]["kl_mean"] for q in quantized.values())


class _Reversed:
    """A decoder whose logits are negated (the FP32 model's favourite token becomes its least likely)."""

    def __init__(self, inner):
        self.inner = inner

    def infer(self, feed, bindings=None):
        out = dict(self.inner.infer(feed))
        out[names.LOGITS] = -np.asarray(out[names.LOGITS])
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_int8_auto_measures_static_and_dynamic_activations(tiny_artifact, tmp_path):
    rep = quantize(tiny_artifact, tmp_path / "auto", "int8", force=True)
    for graph in ("vision", "decoder"):
        details = rep["graphs"][graph]["details"]
        assert set(details["variants"]) == {"static", "dynamic"}
        from edgevl.calibrate.recipes import RECIPES, SPEED_KEY, pick_variant
        budget = RECIPES["int8"].default_max_drop
        assert details["activations"] == pick_variant(details["variants"], budget, SPEED_KEY[graph])


def test_pick_variant_prefers_the_faster_one_with_accuracy_to_spare():
    from edgevl.calibrate.recipes import pick_variant
    scores = {"static": {"loss": 0.0011, "drop": 0.0011, "ms": 1081.0},
              "dynamic": {"loss": 0.0012, "drop": 0.0012, "ms": 707.0}}
    assert pick_variant(scores, 0.05, "ms") == "dynamic"           # both well inside the budget: speed decides
    assert pick_variant(scores, 0.002, "ms") == "static"           # neither within half the budget: accuracy


def test_int4_decoder_weights_are_at_most_35_percent(quantized, tiny_artifact):
    """MatMul weights stored as 4-bit blocks (block 32: packed nibbles + fp32 scale + zero point per block)
    take <= 35% of the same matrices in fp32; the fp32 side is counted from the source graph."""
    folder, rep = quantized["w4a16"]
    rows = graphs.weight_table(onnx.load(str(folder / "decoder.onnx")))
    int4 = [r for r in rows if r["precision"] == "int4"]
    assert len(int4) >= 14                                                          # 7 projections x 2 layers
    source = Counter(r["fp32_bytes"] for r in graphs.weight_table(onnx.load(str(tiny_artifact / "decoder.onnx"))))
    assert not Counter(r["fp32_bytes"] for r in int4) - source                      # the same matrices, 4 B/element
    ratio = sum(r["bytes"] for r in int4) / sum(r["fp32_bytes"] for r in int4)
    assert ratio <= 0.35, ratio
    assert rep["graphs"]["decoder"]["matmul_weights"]["int4"]["ratio"] == pytest.approx(ratio)
    assert rep["graphs"]["decoder"]["ops"]["MatMulNBits"]


def test_int8_vision_passes_checker_and_runs(quantized, tiny_artifact, photos):
    import onnxruntime as ort

    from edgevl.runtime.inputs.image_loading import load_image
    from edgevl.runtime.inputs.image_processing import preprocess_image
    from edgevl.runtime.inputs.rope_index import vision_rotary_position_ids

    path = quantized["int8"][0] / "vision.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    matmul = graphs.precision_by_op(path)["MatMul"]      # 8 ViT linears always int8 (QDQ); the merger's 2 if measured
    assert matmul["int8"] >= 8                            # so; attention's q@k and p@v stay fp32
    from edgevl.artifact import load_artifact
    settings = load_artifact(tiny_artifact).manifest.image_processor
    pixels, (_, h, w) = preprocess_image(load_image(photos["chelsea_odd"]), settings)
    feed = {"pixel_values": pixels.astype(np.float32), "rotary_pos_ids": vision_rotary_position_ids((1, h, w), 2)}
    ref = ort.InferenceSession(str(tiny_artifact / "vision.onnx")).run(None, feed)[0]
    out = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert out.shape == ref.shape and report.cosine_rows(out, ref).mean() > 0.99


def test_broken_quantization_fails_the_gate(tiny_artifact, tmp_path, monkeypatch, capsys):
    """Static int8 with every scale x100: the vision graph collapses; exit 2 names it, nothing is written."""
    real = passes.int8_static

    def broken(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        model = onnx.load(str(dst))
        for init in model.graph.initializer:
            if init.name.endswith("_scale"):
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 100, init.name))
        onnx.save(model, str(dst))

    monkeypatch.setattr(passes, "int8_static", broken)
    out = tmp_path / "broken"
    code = main(["quantize", str(tiny_artifact), "-o", str(out), "--recipe", "int8", "--samples", "3",
                 "--eval-samples", "1", "--new-tokens", "3", "--no-progress", "--activations", "static"])
    captured = capsys.readouterr()
    assert code == 2 and not out.exists()
    errors = [line for line in captured.err.splitlines() if line.startswith("edgevl quantize: error:")]
    assert len(errors) == 1 and "vision graph" in errors[0] and "--force" in errors[0], captured.err
    assert "FAIL" in captured.out                                                   # the table is still printed


def test_gate_pure():
    ok = {"vision": {"metrics": {"cosine_mean": 0.99, "drop": 0.01}},
          "decoder": {"metrics": {"top1_agreement": 0.8, "drop": 0.2}}}
    failures = report.gate(ok, 0.05)
    assert len(failures) == 1 and "decoder" in failures[0]
    assert report.gate(ok, 0.25) == []


def test_metrics_pure():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 16))
    assert np.allclose(report.cosine_rows(a, a), 1) and report.relative_error(a, a) == 0
    assert np.allclose(report.kl_rows(a, a), 0) and (report.kl_rows(a, a + rng.normal(size=a.shape)) > 0).all()
    assert report.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5 and report.prefix_agreement([1], [1]) == 1


def test_calibration_is_deterministic(tiny_artifact, tmp_path):
    from edgevl.runtime.pipeline import Pipeline

    def split(seed):
        pool, _ = data.load_samples(None, 5, seed)
        return data.split_samples(pool, 3, 2, seed)

    (c0, e0), (c1, e1), (c2, _) = split(0), split(0), split(1)
    assert data.samples_digest(c0) == data.samples_digest(c1) and data.samples_digest(e0) == data.samples_digest(e1)
    assert data.samples_digest(c0) != data.samples_digest(c2)
    pipe = Pipeline.load(tiny_artifact)
    stores = [data.FeedStore(tmp_path / f"run{i}") for i in range(2)]
    tokens = [data.capture(pipe, c, store, 2) for c, store in zip((c0[:2], c1[:2]), stores)]
    assert tokens[0] == tokens[1]
    for graph in ("vision", "decoder"):
        files = [store.files(graph) for store in stores]
        assert len(files[0]) == len(files[1]) > 0
        for f0, f1 in zip(*files):
            (a, _), (b, _) = data.FeedStore.load(f0), data.FeedStore.load(f1)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fp16_keeps_range_overflow_nodes_fp32(tiny_artifact, tmp_path):
    """A node whose calibrated range exceeds the limit stays fp32 and its value never round-trips via fp16."""
    model = graphs.load_graph(tiny_artifact / "vision.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    hot = passes.overflow_nodes(model, {gemm.output[0]: 1e6, "other": 1.0})
    assert gemm.name in hot and "1e+06" in hot[gemm.name]
    converted = passes.fp16_convert(model, set(hot), keep_io=[])
    save_graph(converted, tmp_path / "v16.onnx")                                # runs onnx.checker
    out = next(n for n in converted.graph.node if n.name == gemm.name).output[0]
    readers = [n for n in converted.graph.node if out in n.input]
    assert readers and not any(n.op_type == "Cast" for n in readers)                # fp32 consumers read it directly
    ops = graphs.precision_by_op(tmp_path / "v16.onnx")
    assert ops["LayerNormalization"] == {"fp32": 5} and ops["Gemm"].get("fp32", 0) >= 1


def _prefill_logits(folder, embeds: np.ndarray) -> np.ndarray:
    """The decoder's logits for one row of `embeds` [1, S, H], straight through onnxruntime (in-place cache)."""
    import onnxruntime as ort

    from edgevl.artifact import names
    sess = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(i.type) for i in sess.get_inputs()}
    seq = embeds.shape[1]
    feed = {names.INPUTS_EMBEDS: embeds.astype(types[names.INPUTS_EMBEDS]),
            names.POSITION_IDS: np.broadcast_to(np.arange(seq), (3, 1, seq)).copy(),
            names.SEQLENS_K: np.array([seq - 1], np.int32), names.TOTAL_SEQUENCE_LENGTH: np.array(seq, np.int32)}
    for i in sess.get_inputs():
        if i.name not in feed:                                                  # the KV cache buffers
            feed[i.name] = np.zeros((1, i.shape[1], 16, i.shape[3]), types[i.name])
    return sess.run([names.LOGITS], feed)[0][0].astype(np.float64)


def test_fp16_norms_survive_hidden_states_past_fp16s_square_range(quantized, tiny_artifact):
    """Real checkpoints carry outlier activations of hundreds to thousands, whose squares overflow fp16 (65504):
    an fp16 artifact's RMSNorms must square in float32 (the norm pattern stays fp32 in the converted graph, and
    onnxruntime fuses it into SimplifiedLayerNormalization, float32 inside), or these rows turn into garbage."""
    from edgevl.artifact import load_artifact
    hidden = load_artifact(tiny_artifact).config.hidden_size
    embeds = np.random.default_rng(0).standard_normal((1, 3, hidden)).astype(np.float32) * 1000   # |x| up to ~3000
    fp32, fp16 = _prefill_logits(tiny_artifact, embeds), _prefill_logits(quantized["fp16"][0], embeds)
    assert np.isfinite(fp16).all()
    assert fp16 @ fp32 / (np.linalg.norm(fp16) * np.linalg.norm(fp32)) > 0.999


def test_user_errors(tiny_artifact, quantized, tmp_path):
    with pytest.raises(EdgevlError, match="does not exist"):
        quantize(tiny_artifact, tmp_path / "a", "int8", calib=str(tmp_path / "nope"))
    with pytest.raises(EdgevlError, match="already quantized"):
        quantize(quantized["int8"][0], tmp_path / "b", "int8")
    with pytest.raises(EdgevlError, match="already exists"):
        quantize(tiny_artifact, quantized["fp16"][0], "fp16")
    with pytest.raises(EdgevlError, match="--block-size"):
        quantize(tiny_artifact, tmp_path / "c", "w4a16", block_size=24)
    if not passes.gptq_differs_from_rtn():                   # onnxruntime 1.32: its GPTQ equals RTN; refused early
        with pytest.raises(EdgevlError, match="gptq"):
            quantize(tiny_artifact, tmp_path / "e", "w4a16", w4_algorithm="gptq")
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"prompt": "hi", "image": "missing.png"}\n')
    with pytest.raises(EdgevlError, match="line 1"):
        quantize(tiny_artifact, tmp_path / "d", "int8", calib=str(bad))


def test_every_option_has_help():
    import argparse
    sub = argparse.ArgumentParser().add_subparsers()
    add_quantize_parser(sub)
    parser = sub.choices["quantize"]
    assert all(action.help for action in parser._actions)
    assert all(name in parser.epilog for name in ("fp16", "int8", "w4a16", "awq"))
    assert "activation-aware" in parser.format_help()


def test_w4a16_awq_makes_an_artifact_no_worse_than_rtn_on_calibration(tiny_artifact, quantized, photos, tmp_path):
    """AWQ scales from the recorded calibration feeds; the decoder is measured against plain RTN on calibration
    samples and AWQ is kept only when its KL is not higher (the report holds both numbers)."""
    from edgevl.artifact import load_artifact
    from edgevl.runtime.pipeline import Pipeline

    folder = tmp_path / "awq"
    rep = quantize(tiny_artifact, folder, "w4a16", block_size=32, force=True, w4_algorithm="awq")
    result = Pipeline.load(folder).generate("What is this?", images=[photos["coffee"]], max_new_tokens=3,
                                            do_sample=False)
    assert 1 <= len(result.token_ids) <= 3
    q = load_artifact(folder).manifest.quantization
    assert q.options["w4_algorithm"] == "awq" and q.options["block_size"] == 32
    details = rep["graphs"]["decoder"]["details"]
    summary = details["awq"]
    assert summary["groups"] == 8                                      # q/k/v, o, gate/up, down x 2 layers
    assert all(g["awq_loss"] <= g["rtn_loss"] for g in summary["per_group"])
    assert summary["scaled_groups"] >= 1 and 0 <= summary["alpha"]["min"] <= summary["alpha"]["max"] <= 1
    vs = summary["vs_rtn"]
    assert vs["kept"] == details["algorithm"] and vs[vs["kept"]]["kl_mean"] <= min(vs["awq"]["kl_mean"],
                                                                                  vs["rtn"]["kl_mean"])
    assert f"({vs['kept']}, block 32)" in rep["graphs"]["decoder"]["precision"]
    assert "awq" in rep["graphs"]["decoder"]["details"]["notes"]
    # the RTN reference is the same graph the rtn recipe builds: same calibration KL at lm_head int4
    rtn_first = quantized["w4a16"][1]["graphs"]["decoder"]["trials"][0]
    assert rtn_first["levels"] == {"lm_head": "int4"}
    assert vs["rtn"]["kl_mean"] == pytest.approx(rtn_first["kl_mean"], rel=1e-4)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_calibrate_in_strides(tiny_artifact, tmp_path, monkeypatch, method):
    """entropy / percentile (and minmax) collect one feed at a time: bounded memory, and feeds of different
    image sizes (which onnxruntime's histogram collector cannot stack) work."""
    from edgevl.calibrate import context
    ranges = []
    original = context.feed_reader

    def spying_reader(*args, **kwargs):
        reader = original(*args, **kwargs)
        cls = type(reader)                    # patched on the class: onnxruntime may deep-copy the reader
        set_range = cls.set_range
        cls.set_range = lambda self, start_index, end_index: (ranges.append((start_index, end_index)),
                                                              set_range(self, start_index, end_index))[1]
        return reader

    monkeypatch.setattr(context, "feed_reader", spying_reader)
    rep = quantize(tiny_artifact, tmp_path / method, "int8", method=method, force=True)
    assert rep["method"] == method
    assert ranges and all(end - start == 1 for start, end in ranges)


def test_saved_graphs_past_the_threshold_keep_weights_in_a_data_file(tiny_artifact, tmp_path, monkeypatch):
    import onnxruntime as ort

    from edgevl.artifact import load_artifact, onnx_files
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_MIN_BYTES", 0)
    src = load_artifact(tiny_artifact).graph_path("vision")
    dst = tmp_path / "vision.onnx"
    save_graph(graphs.load_graph(src), dst)                 # checker included
    assert [p.name for p in graphs.graph_files(dst)] == ["vision.onnx", "vision.onnx.data"]
    shaped = graphs.with_shapes(dst)                               # shapes inferred, weights read back
    assert shaped.graph.value_info and all(t.data_location != onnx.TensorProto.EXTERNAL
                                           for t in shaped.graph.initializer)
    rng = np.random.default_rng(0)
    feed = {"pixel_values": rng.standard_normal((16, 1176), dtype=np.float32),
            "rotary_pos_ids": np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(16, 2)}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0] for p in (src, dst))
    assert np.array_equal(a, b)


def test_quantize_on_an_engine_backend_builds_runners_for_work_folder_graphs(tiny_artifact_standard, tmp_path,
                                                                            monkeypatch):
    """`edgevl quantize --backend trt`: candidate graphs live in a work folder without a manifest; the real trt
    factory builds their runners from a GraphSpec (TensorRT and CUDA replaced by the CPU stand-ins)."""
    import dataclasses

    from edgevl.runtime.backends import table as backends
    from edgevl.runtime.backends import probe, trt
    from tests.fake_trt import FakeEngine, HostMemory

    memory = HostMemory()
    built = []

    class FakeFromBytes:
        def __init__(self, load):
            self.build = load.build                      # EngineFromCache -> its EngineFromOnnx

        def __call__(self):
            built.append(self.build.path)
            return FakeEngine(self.build.path, memory, self.build.profiles)

    monkeypatch.setattr(probe, "gpus", lambda: [probe.GpuInfo(0, "NVIDIA Jetson Orin", (8, 7), 8 << 30)])
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(trt, "CudaMemory", lambda device_id=0: memory)
    monkeypatch.setattr(trt, "EngineFromBytes", FakeFromBytes)
    monkeypatch.setitem(backends.BACKENDS, "trt", dataclasses.replace(backends.BACKENDS["trt"],
                                                                     available=lambda: (True, "")))
    out = tmp_path / "int8-trt"
    code = main(["quantize", str(tiny_artifact_standard), "-o", str(out), "--recipe", "int8", "--activations", "static",
                 "--samples", "4", "--eval-samples", "2", "--new-tokens", "4", "--max-drop", "0.5", "--no-progress",
                 "--backend", "trt", "--max-context", "512", "--engine-cache", str(tmp_path / "engines")])
    assert code == 0
    work = [p for p in built if "edgevl-quantize-" in str(p)]
    assert work and all(not (p.parent / "manifest.json").exists() for p in work)   # candidates: no manifest
    assert any(p.parent.name.startswith(".int8-trt.partial-") for p in built)       # and the staged artifact
    rep = json.loads((out / REPORT).read_text())
    assert rep["backend"] == "trt" and not rep["failed"]


def test_an_untied_table_is_quantized_on_its_own(quantized):
    """The tiny preset is untied: each recipe stores the table at its own precision (fp16 / 8-bit / 4-bit rows)."""
    expected = {"fp16": ("dense", None), "int8": ("blocks", 8), "w4a16": ("blocks", 4)}
    from edgevl.artifact import load_artifact
    for recipe, (folder, rep) in quantized.items():
        emb = load_artifact(folder).manifest.embeddings
        assert (emb.encoding, emb.bits) == expected[recipe] and not emb.tied
        assert rep["embeddings"]["cosine_mean"] > (0.999 if recipe == "fp16" else 0.97)
