"""Qwen2.5-VL against transformers: window attention in the vision graph, video time ids, greedy tokens.

The tiny-2.5 model has 4 ViT blocks (the 2nd and 4th attend over the whole image, the others within
56-pixel windows of 4x4 patches), so every test image holds several windows, partial ones at the edges.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevl.runtime.inputs.video import VideoClip
from edgevl.runtime.inputs.windows import window_layout
from tests.data.video_frames import synthetic_frames
from tests.hf_reference import strip_after_eos

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("tiny25") / "model", preset="tiny-2.5", seed=1)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["ort", "standard"])
def pipe(request, model_dir, tmp_path_factory):
    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    out = tmp_path_factory.mktemp("export25") / request.param
    return Pipeline.load(export_model(str(model_dir), out, variant=request.param, log=lambda m: None),
                         backend="ort-cpu")


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol * max(1.0, np.abs(ref).max())


def _hf_vision(hf, pv, grid) -> np.ndarray:
    with torch.no_grad():
        return hf.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor([grid])).pooler_output.numpy()


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 10, 14), (1, 4, 4), (1, 2, 30), (1, 18, 6), (2, 6, 18)])
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_layout_matches_transformers(grid, window_size):
    from transformers.vision_utils import get_vision_window_index
    t, h, w = grid
    index, cu = get_vision_window_index(torch.tensor([grid]), 2, window_size, 14)
    per_frame = h * w // 4
    layout = window_layout(h, w, 2, window_size, 14)
    expected = np.concatenate([layout.unit_order + k * per_frame for k in range(t)])
    np.testing.assert_array_equal(expected, index.numpy())
    sizes = np.tile(layout.mask.sum(1), t)                      # patches per window, every frame
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes)]), cu.numpy())
    # the graph's view: each row in exactly one slot, slots in window order
    assert sorted(layout.gather[layout.mask == 1].tolist()) == list(range(h * w))
    np.testing.assert_array_equal(layout.gather.reshape(-1)[layout.scatter], np.arange(h * w))


# ----------------------------------------------------------------------------- vision
@pytest.mark.parametrize("photo", ["astronaut", "chelsea_odd", "coffee", "camera_gray"])
def test_vision_matches_transformers(photo, pipe, hf, photos):
    row = pipe.prepare("Describe.", images=[photos[photo]])
    (pv,), (grid,) = row.pixel_values, row.grids
    _close(pipe.encode_image(pv, grid), _hf_vision(hf, pv, grid))


@pytest.mark.parametrize("shape", [(4, 84, 112), (6, 140, 56)])
def test_vision_on_video_frames_matches_transformers(shape, pipe, hf):
    """Two and three temporal patches: windows never span frames, full attention neither."""
    clip = VideoClip(synthetic_frames(*shape), 2.0, shape[0], np.arange(shape[0]))
    (video,) = pipe.video_patches([clip])
    pv, grid = video.pixel_values, video.grid
    assert grid[0] == shape[0] // 2
    _close(pipe.encode_image(pv, grid), _hf_vision(hf, pv, grid))


def test_manifest_records_the_windows(pipe):
    cfg = pipe.config
    assert (cfg.model_type, cfg.vision_window_size, cfg.vision_fullatt_blocks, cfg.tokens_per_second) == \
        ("qwen2_5_vl", 56, (1, 3), 2)


# ----------------------------------------------------------------------------- positions
def _rope_case(pipe, hf, fps: float, images: list, frames: int = 8):
    clip = VideoClip(synthetic_frames(frames, 56, 84), fps * 2, frames * 2, np.arange(0, frames * 2, 2))
    assert clip.sampled_fps == pytest.approx(fps)
    row = pipe.prepare("Describe.", images=images, videos=[clip])
    ids = row.input_ids[None]
    ours, deltas = pipe.positions(ids, np.ones_like(ids), row.grids, row.video_grids, row.video_seconds)
    tids = torch.from_numpy(ids)
    types = (tids == hf.config.image_token_id).int() + 2 * (tids == hf.config.video_token_id).int()
    ref, ref_deltas = hf.model.get_rope_index(
        tids, mm_token_type_ids=types, image_grid_thw=torch.tensor(row.grids) if row.grids else None,
        video_grid_thw=torch.tensor(row.video_grids), second_per_grid_ts=torch.tensor(row.video_seconds))
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())
    return ours, ids


@pytest.mark.parametrize("fps", [2.0, 3.0, 1.5, 0.7, 24 / 7])
def test_video_time_ids_match_get_rope_index(fps, pipe, hf):
    ours, ids = _rope_case(pipe, hf, fps, [])
    video = ids[0] == hf.config.video_token_id
    steps = np.unique(ours[0, 0][video])
    assert len(steps) == 4                                       # 8 frames: 4 temporal patches
    assert steps[1] - steps[0] == int(np.float32(2) * np.float32(2 / fps))   # tokens_per_second x seconds


def test_image_and_video_positions_match_get_rope_index(pipe, hf, photos):
    _rope_case(pipe, hf, 1.5, [photos["chelsea_odd"], photos["coffee"]], frames=6)


# ----------------------------------------------------------------------------- greedy tokens
CASES = {
    "one_image": ("Describe this image in detail.", ["astronaut"]),
    "odd_sized_image": ("What is in the picture?", ["chelsea_odd"]),
    "two_images": ("Compare the two pictures.", ["astronaut", "coffee"]),
    "text_only": ("Write a short story about a robot who learns to paint.", []),
}


def _hf_greedy(hf, ids, extra, types):
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                          max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0, **extra)
    return out[0, ids.shape[1]:].tolist()


def _torch_inputs(row, hf):
    ids = torch.from_numpy(row.input_ids[None])
    types = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
    extra = {}
    if row.grids:
        extra.update(pixel_values=torch.from_numpy(np.concatenate(row.pixel_values)),
                     image_grid_thw=torch.tensor(row.grids))
    if row.video_grids:
        extra.update(pixel_values_videos=torch.from_numpy(np.concatenate(row.video_pixel_values)),
                     video_grid_thw=torch.tensor(row.video_grids), second_per_grid_ts=torch.tensor(row.video_seconds))
    return ids, extra, types


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, pipe, hf, photos):
    prompt, names = CASES[case]
    images = [photos[n] for n in names]
    row = pipe.prepare(prompt, images=images)
    ids, extra, types = _torch_inputs(row, hf)
    ours = pipe.generate(prompt, images=images, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    assert ours.token_ids == strip_after_eos(_hf_greedy(hf, ids, extra, types), pipe.config.eos_token_id)
    assert len(set(ours.token_ids)) > 3                          # a varied reply, not one repeated token


@pytest.mark.parametrize("fps", [2.0, 1.5])
def test_video_greedy_tokens_equal_transformers(fps, pipe, hf, photos):
    """Video time ids at 2 and 1.5 sampled fps (spaced 2 and 2.67 -> 2 per temporal patch), with an image."""
    clip = VideoClip(synthetic_frames(8, 84, 112), fps * 2, 16, np.arange(0, 16, 2))
    prompt = "What happens in the video?"
    row = pipe.prepare(prompt, images=[photos["coffee"]], videos=[clip])
    ids, extra, types = _torch_inputs(row, hf)
    ours = pipe.generate(prompt, images=[photos["coffee"]], videos=[clip], max_new_tokens=NEW_TOKENS,
                         do_sample=False, repetition_penalty=1.0)
    assert ours.token_ids == strip_after_eos(_hf_greedy(hf, ids, extra, types), pipe.config.eos_token_id)
    assert len(set(ours.token_ids)) > 3


# ----------------------------------------------------------------------------- other geometries
_TINY_VARIANTS = {
    "gqa_4_to_1": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, mrope_section=(2, 3, 3)),
    "mrope_4_2_2": dict(mrope_section=(4, 2, 2)),
    "window_112": dict(window_size=112),
    "fullatt_first_only": dict(fullatt_block_indexes=(0,)),
    "no_full_attention": dict(fullatt_block_indexes=()),
}


@pytest.mark.parametrize("name", list(_TINY_VARIANTS))
def test_other_geometries_match_transformers(name, tmp_path, photos):
    """GQA ratio, M-RoPE sections, window size and full-attention blocks come from the config, not constants."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.synthetic.architectures import PRESETS
    from edgevl.synthetic.random_model import write_random_model
    preset = replace(PRESETS["tiny-2.5"], **_TINY_VARIANTS[name])
    model_dir = write_random_model(tmp_path / "model", preset, seed=2)
    pipe = Pipeline.load(export_model(str(model_dir), tmp_path / "out", log=lambda m: None), backend="ort-cpu")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    _check_image_step(pipe, hf, photos["chelsea_odd"])


def _check_image_step(pipe, hf, image) -> None:
    """Vision embeddings and the prefill's last logits for one image, against transformers."""
    from edgevl.runtime.generate import decoder_step
    row = pipe.prepare("Describe.", images=[image])
    (pv,), (grid,) = row.pixel_values, row.grids
    vision = pipe.encode_image(pv, grid)
    _close(vision, _hf_vision(hf, pv, grid))
    ids = row.input_ids[None]
    positions, _ = pipe.positions(ids, np.ones_like(ids), [grid])
    embeds = pipe.embed(row.input_ids, [vision])[None]
    logits = decoder_step(pipe.decoder, pipe.new_cache(1), embeds, positions, np.array([ids.shape[1]]))["logits"]
    tids, extra, types = _torch_inputs(row, hf)
    with torch.no_grad():
        ref = hf(input_ids=tids, attention_mask=torch.ones_like(tids), mm_token_type_ids=types,
                 **extra).logits[:, -1].numpy()
    _close(logits.reshape(ref.shape), ref)


REAL = {
    "qwen2.5-vl-3b": {},
    "qwen2.5-vl-7b": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", [(n, "ort") for n in REAL] + [("qwen2.5-vl-3b", "standard")])
def test_real_geometries_at_one_layer(name, variant, tmp_path, photos):
    """The 3B and 7B widths, heads, windows (112 px) and vision MLP at one layer and a small vocabulary."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.synthetic.architectures import PRESETS, TINY_VOCAB_SIZE
    from edgevl.synthetic.random_model import write_random_model
    preset = replace(PRESETS[name], num_hidden_layers=1, vision_depth=2, fullatt_block_indexes=(1,),
                     vocab_size=TINY_VOCAB_SIZE, intermediate_size=256, dtype="float32")
    model_dir = write_random_model(tmp_path / "model", preset)
    pipe = Pipeline.load(export_model(str(model_dir), tmp_path / "out", variant=variant, log=lambda m: None),
                         backend="ort-cpu")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert pipe.config.vision_window_size == 112 and pipe.config.head_dim == 128
    _check_image_step(pipe, hf, photos["coffee"])


# ----------------------------------------------------------------------------- the server
def test_server_answers_with_the_runtime_s_tokens(pipe, photos):
    """`edgevl serve` on a Qwen2.5-VL export: an image request gives the pipeline's greedy reply."""
    import base64

    import httpx

    from edgevl.serve.app import create_app
    from tests.serve_helpers import running
    url = "data:image/png;base64," + base64.b64encode(photos["chelsea_odd"].read_bytes()).decode()
    body = {"model": "tiny-2.5", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is this?"}]}]}
    with running(create_app(pipe, "tiny-2.5")) as base:
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    expected = pipe.generate("What is this?", images=[photos["chelsea_odd"]], max_new_tokens=8, do_sample=False)
    assert reply.json()["choices"][0]["message"]["content"] == expected.text
    assert reply.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


# ----------------------------------------------------------------------------- quantized
@pytest.mark.parametrize("recipe", ["fp16", "int8", "w4a16"])
def test_quantized_recipes_run_the_window_graph(recipe, model_dir, tmp_path, photos):
    """Each recipe on a Qwen2.5-VL export: calibration feeds the window inputs, the vision output stays close to
    fp32 (cosine per embedding) and the runtime generates from the result."""
    from edgevl.calibrate.options import QuantizeOptions
    from edgevl.calibrate.quantize import quantize
    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    fp32 = export_model(str(model_dir), tmp_path / "fp32", log=lambda m: None)
    options = QuantizeOptions(recipe, samples=4, eval_samples=2, new_tokens=4, calib_steps=3, progress=False,
                              force=True)
    out = quantize(fp32, tmp_path / recipe, options, None, log=lambda m: None, table=lambda t: None)
    assert out["recipe"] == recipe
    ref_pipe, pipe = Pipeline.load(fp32), Pipeline.load(tmp_path / recipe)
    row = pipe.prepare("Describe.", images=[photos["coffee"]])
    (pv,), (grid,) = row.pixel_values, row.grids
    a, b = ref_pipe.encode_image(pv, grid), pipe.encode_image(pv, grid)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > {"fp16": 0.999, "int8": 0.99, "w4a16": 0.99}[recipe]      # measured 0.9995, 0.998, 0.996
    result = pipe.generate("What is this?", images=[photos["coffee"]], max_new_tokens=4, do_sample=False)
    assert 1 <= len(result.token_ids) <= 4


def test_standard_graphs_at_opset_18_match_transformers(model_dir, hf, tmp_path, photos):
    """The decomposed window attention (primitive ops, for TensorRT 10.3 / JetPack 6)."""
    import onnx

    from edgevl.export.exporter import export_model
    from edgevl.runtime.pipeline import Pipeline
    out = export_model(str(model_dir), tmp_path / "o18", variant="standard", opset=18, log=lambda m: None)
    vision = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    assert not {n.op_type for n in vision.graph.node} & {"Attention", "MultiHeadAttention"}
    _check_image_step(Pipeline.load(out, backend="ort-cpu"), hf, photos["chelsea_odd"])


def test_tensorrt_runner_takes_the_window_graph(model_dir, tmp_path, photos):
    """The TensorRT path over stand-in engines (tests/fake_trt.py): profiles bound num_windows, the buffers hold
    the window inputs, and the tokens equal the ONNX Runtime run of the same graphs."""
    from edgevl.artifact import load_artifact
    from edgevl.export.exporter import export_model
    from edgevl.runtime.backends import sizing
    from edgevl.runtime.pipeline import Pipeline
    from tests.fake_trt import fake_trt_runners
    out = export_model(str(model_dir), tmp_path / "std", variant="standard", log=lambda m: None)
    art, pipe = load_artifact(out), Pipeline.load(out, backend="ort-cpu")
    limits = sizing.Limits(max_context=512, max_image_patches=1024)
    (profile,) = sizing.build_profiles("vision", art.manifest.graph("vision").inputs, limits, art.config)
    assert profile.shapes["window_gather"] == ((1, 16), (64, 16), (256, 16))   # 16 slots: (56 / 14)^2
    expected = pipe.generate("What is this?", images=[photos["chelsea_odd"]], max_new_tokens=6, do_sample=False)
    runners, _ = fake_trt_runners(art, limits)
    pipe.vision, pipe.decoder = runners["vision"], runners["decoder"]
    got = pipe.generate("What is this?", images=[photos["chelsea_odd"]], max_new_tokens=6, do_sample=False)
    assert got.token_ids == expected.token_ids
    for runner in runners.values():
        runner.deactivate()
