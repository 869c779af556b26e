"""Export (export/exporter.py): graph structure, the MRoPE custom op in the decoder, vision/decoder parity with
transformers, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgevl.artifact import FORMAT_VERSION, load_artifact
from edgevl.errors import EdgevlError
from edgevl.export.mrope import DOMAIN, OP_NAME
from edgevl.runtime.inputs.image_processing import preprocess_image
from edgevl.runtime.backends.tensors import to_host


def test_manifest_describes_the_artifact(tiny_artifact, hf_model):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    cfg = load_artifact(tiny_artifact).config
    text = hf_model.config.text_config
    assert cfg.mrope_section == tuple(text.rope_parameters["mrope_section"])
    assert cfg.image_token_id == hf_model.config.image_token_id
    assert cfg.num_hidden_layers == text.num_hidden_layers
    assert m["image_processor"]["min_pixels"] == 3136 and len(m["image_processor"]["image_mean"]) == 3
    for name in ("vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json"):
        assert name in m["files"] and len(m["files"][name]) == 64
    dec = m["graphs"]["decoder"]
    assert [i["name"] for i in dec["inputs"][:4]] == ["inputs_embeds", "position_ids", "seqlens_k",
                                                       "total_sequence_length"]
    assert dec["inputs"][1]["shape"] == [3, "batch", "sequence"] and dec["inputs"][3]["shape"] == []
    assert dec["inputs"][4]["shape"] == ["batch", text.num_key_value_heads, "max_context", 16]
    assert [o["name"] for o in dec["outputs"][:2]] == ["logits", "next_token"]
    assert dec["outputs"][2]["shape"] == dec["inputs"][4]["shape"]        # present is the same buffer as past
    assert dec["kv_cache"] == "in_place" and dec["variant"] == "ort"
    assert m["graphs"]["vision"]["inputs"][0]["shape"] == ["num_patches", 3 * 2 * 14 * 14]
    assert dec["kind"] == "decoder" and dec["precision"] == "fp32" and dec["custom_ops"] == ["edgevl.MRoPE"]
    assert m["graphs"]["vision"]["custom_ops"] == [] and dec["data_files"] == []
    assert {"torch", "transformers", "onnx", "edgevl"} <= set(m["versions"])
    load_artifact(tiny_artifact)  # verifies every hash


@pytest.mark.parametrize("variant", ["ort", "standard"])
def test_decoder_keeps_mrope_custom_op_and_passes_checker(variant, tiny_artifact, tiny_artifact_standard, hf_model):
    folder = tiny_artifact if variant == "ort" else tiny_artifact_standard
    model = onnx.load(str(folder / "decoder.onnx"))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]
    assert len(nodes) == 1                           # the tables once per call, not once per layer
    section = [a for a in nodes[0].attribute if a.name == "mrope_section"][0]
    assert list(section.ints) == [2, 3, 3]
    assert any(f.domain == DOMAIN and f.name == OP_NAME for f in model.functions)
    assert any(i.domain == DOMAIN for i in model.opset_import)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    layers = hf_model.config.text_config.num_hidden_layers
    if variant == "ort":
        assert ("com.microsoft", "GroupQueryAttention") in ops and ("com.microsoft", "RotaryEmbedding") in ops
        assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == layers
    else:
        assert {d for d, _ in ops} <= {"", DOMAIN}       # ONNX-standard ops (and our function) only
        assert {("", "Attention"), ("", "RotaryEmbedding"), ("", "RMSNormalization")} <= ops
        assert not any(n.op_type == "Softmax" for n in model.graph.node)


@pytest.mark.parametrize("graph", ["decoder", "vision"])
def test_onnxruntime_fuses_the_norms_and_shares_the_rotary_token_index(graph, tiny_artifact, hf_model, tmp_path):
    """What onnxruntime makes of the ort graphs at load: every decoder RMSNorm one SimplifiedLayerNormalization
    (none left as Sqrt + Reciprocal), and the rotary token index computed once per graph, not per q/k node."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tiny_artifact / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    count = {op: sum(n.op_type == op for n in nodes) for op in ("SimplifiedLayerNormalization", "Reciprocal",
                                                                 "RotaryEmbedding", "Range")}
    rotary_ranges = 1 if graph == "vision" else 2          # the decoder has one more: its rows' last tokens
    assert count["RotaryEmbedding"] >= 4 and count["Range"] <= rotary_ranges
    if graph == "decoder":
        layers = hf_model.config.text_config.num_hidden_layers
        assert count["SimplifiedLayerNormalization"] == 2 * layers + 1 and count["Reciprocal"] == 0


def _hf_vision(hf_model, pixel_values, grids):
    with torch.no_grad():
        out = hf_model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


@pytest.mark.parametrize("size", [(224, 224), (333, 217), (640, 360), (56, 1000)])
def test_vision_matches_transformers_for_several_sizes(tiny_artifact, hf_model, pipeline, photos, size):
    from PIL import Image
    image = Image.open(photos["coffee"]).convert("RGB").resize(size)
    pv, grid = preprocess_image(image, pipeline.image_settings)
    ours = pipeline.encode_image(pv, grid)
    ref = _hf_vision(hf_model, pv, [grid])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_vision_two_images_at_once_and_one_large(hf_model, any_pipeline, photos):
    pipeline = any_pipeline
    from PIL import Image
    images = [Image.open(photos["astronaut"]).convert("RGB"), Image.open(photos["chelsea_odd"]).convert("RGB")]
    processed = [preprocess_image(img, pipeline.image_settings) for img in images]
    ours = np.concatenate([pipeline.encode_image(pv, g) for pv, g in processed])
    ref = _hf_vision(hf_model, np.concatenate([pv for pv, _ in processed]), [g for _, g in processed])
    assert np.abs(ours - ref).max() <= 1e-4
    large = Image.open(photos["astronaut"]).convert("RGB").resize((1344, 1008))  # 48x36 = 1728 patches
    pv, grid = preprocess_image(large, pipeline.image_settings)
    assert grid[1] * grid[2] > 1500
    assert np.abs(pipeline.encode_image(pv, grid) - _hf_vision(hf_model, pv, [grid])).max() <= 1e-4


def test_vision_graph_runs_video_temporal_patches_separately(hf_model, pipeline):
    """t > 1: each temporal patch attends alone, exactly as transformers' cu_seqlens do."""
    rng = np.random.default_rng(0)
    grid = (3, 4, 6)
    pv = rng.standard_normal((3 * 4 * 6, 3 * 2 * 14 * 14)).astype(np.float32)
    assert np.abs(pipeline.encode_image(pv, grid) - _hf_vision(hf_model, pv, [grid])).max() <= 1e-4


def test_decoder_logits_and_cache_match_transformers(any_pipeline, hf_model):
    """Prefill + two decode steps through the runner vs transformers' forward with a cache."""
    from transformers import DynamicCache

    from edgevl.runtime.generate import decoder_step
    pipeline = any_pipeline
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 2000, (1, 9))
    embeds = pipeline.embeddings.rows(ids).astype(np.float32)
    cache = pipeline.new_cache(1)
    hf_cache = DynamicCache(config=hf_model.config.text_config)
    for step, chunk in enumerate([ids[:, :7], ids[:, 7:8], ids[:, 8:9]]):
        start = cache.length
        pos = np.broadcast_to(np.arange(start, start + chunk.shape[1])[None, None], (3, 1, chunk.shape[1]))
        mask = np.ones((1, start + chunk.shape[1]), np.int64)
        ours = decoder_step(pipeline.decoder, cache, embeds[:, start:start + chunk.shape[1]], pos.copy(),
                            np.array([chunk.shape[1]]))
        with torch.no_grad():
            out = hf_model(input_ids=torch.from_numpy(chunk), cache=hf_cache, use_cache=True,
                           position_ids=torch.from_numpy(pos.copy()), attention_mask=torch.from_numpy(mask))
        assert np.abs(ours["logits"] - out.logits[:, -1].numpy()).max() <= 1e-4, f"step {step}"
        assert (ours["next_token"] == out.logits[:, -1].argmax(-1).numpy()).all()
        hf_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    hf_key0 = hf_cache.layers[0].keys.numpy()
    key0 = (to_host(cache.buffers["past_key_values.0.key"])[:, :, :9] if hasattr(cache, "buffers")
            else cache.arrays["past_key_values.0.key"])
    assert np.abs(key0 - hf_key0).max() <= 1e-4


def test_unknown_model_type_is_rejected(tmp_path):
    from edgevl.export.exporter import export_model
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EdgevlError, match="'llama' model"):
        export_model(str(tmp_path / "m"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    from edgevl.export import exporter

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way

    monkeypatch.setattr(exporter, "export_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(str(tiny_model_dir), tmp_path / "out", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_model_dir, tiny_artifact):
    from edgevl.export.exporter import export_model
    with pytest.raises(EdgevlError, match="already exists"):
        export_model(str(tiny_model_dir), tiny_artifact)


def test_fp16_export_runs_close_to_fp32(tiny_model_dir, tmp_path, pipeline, photos):
    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    out = export_model(str(tiny_model_dir), tmp_path / "fp16", dtype="fp16", log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["decoder"]["inputs"][0]["dtype"] == "float16"
    assert m["graphs"]["decoder"]["custom_ops"] == ["edgevl.MRoPE"] and m["graphs"]["decoder"]["precision"] == "fp16"
    half = Pipeline.load(out)
    row = half.prepare("Describe.", images=[photos["coffee"]])
    (pv,), (grid,) = row.pixel_values, row.grids
    a = half.encode_image(pv, grid).astype(np.float32)
    b = pipeline.encode_image(pv, grid)
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.999
    r16 = half.generate("Describe.", images=[photos["coffee"]], max_new_tokens=4, do_sample=False)
    r32 = pipeline.generate("Describe.", images=[photos["coffee"]], max_new_tokens=4, do_sample=False)
    assert r16.prompt_token_ids == r32.prompt_token_ids
    assert r16.token_ids[0] == r32.token_ids[0]


def test_weights_past_the_threshold_go_to_external_data_with_the_same_outputs(tiny_model_dir, tmp_path, pipeline,
                                                                              photos, monkeypatch):
    # Real exports put every graph past 64 MiB of weights in <graph>.data (memory-mapped by onnxruntime);
    # a zero threshold takes that path on the tiny model.
    from edgevl.artifact import onnx_files
    from edgevl.export import exporter
    from edgevl.runtime.pipeline import Pipeline
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_MIN_BYTES", 0)
    out = exporter.export_model(str(tiny_model_dir), tmp_path / "external", dtype="fp32", log=lambda msg: None)
    manifest = load_artifact(out).manifest
    for graph in ("vision", "decoder"):
        (data,) = manifest.graph(graph).data_files                     # read from the graph, not guessed
        assert data == manifest.graph(graph).file + ".data"
        assert (out / data).stat().st_size > 0 and data in manifest.files
    external = Pipeline.load(out, backend="ort-cpu")          # verify=True: the .data files are hashed
    kwargs = dict(images=[photos["coffee"]], max_new_tokens=8, do_sample=False)
    assert external.generate("Describe.", **kwargs).token_ids == pipeline.generate("Describe.", **kwargs).token_ids
