"""Qwen3-VL through the torch-free runtime, against transformers' `qwen3_vl`: prompt ids, first-step logits and greedy
tokens for text, images of both resize branches, two images and a video with per-patch timestamps, on both graph
variants; the DeepStack features the runtime feeds (dropping them moves the logits far off); the batch scheduler and
a multi-turn chat on the same model.

transformers' Qwen3-VL processor needs torchvision (not installed here): its steps are spelled out as for Qwen2-VL
(edgevl.bench.reference.processor_inputs with the PIL image processor, which reads the checkpoint's patch size and
mean/std), and the video path hands transformers the runtime's own pixels and prompt, whose processor equivalence is
checked against recorded outputs in tests/runtime/inputs/test_qwen3_vl_video.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgevl.artifact import names
from edgevl.runtime.generate import Prompt, prefill
from edgevl.runtime.inputs.video import VideoClip
from edgevl.runtime.pipeline import Pipeline
from edgevl.runtime.sampling import HostOutputs
from tests.data.video_frames import synthetic_frames

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pipe(qwen3_artifact):
    return Pipeline.load(qwen3_artifact, backend="ort-cpu")


@pytest.fixture(scope="module")
def hf_inputs(qwen3_model_dir):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from edgevl.bench.reference import processor_inputs
    tokenizer = AutoTokenizer.from_pretrained(qwen3_model_dir)
    tokenizer.chat_template = json.loads((qwen3_model_dir / "chat_template.json").read_text())["chat_template"]
    processor = Qwen2VLImageProcessorPil.from_pretrained(qwen3_model_dir)
    return lambda prompt, images: processor_inputs(tokenizer, processor, prompt, images)


def _images(*sizes) -> list[Image.Image]:
    rng = np.random.default_rng(sum(h * w for h, w in sizes))
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]


CASES = {
    "text": ("Write a short story about a lighthouse.", ()),
    "one_image": ("What is in this picture?", ((300, 400),)),
    "tiny_image_upscaled": ("And this one?", ((37, 53),)),          # under min_pixels: smart_resize scales up
    "two_images": ("Compare the two pictures.", ((300, 400), (123, 457))),
}


def _hf_generate(hf, ids, **extra) -> list[int]:
    types = torch.zeros_like(ids)
    types[ids == hf.config.image_token_id], types[ids == hf.config.video_token_id] = 1, 2
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                          max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0, **extra)
    return out[0, ids.shape[1]:].tolist()


def _ours(pipe, prompt, images=(), videos=()):
    return pipe.generate(prompt, images=list(images), videos=list(videos), max_new_tokens=NEW_TOKENS,
                         do_sample=False, repetition_penalty=1.0)


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_and_greedy_tokens_equal_transformers(case, pipe, qwen3_hf, hf_inputs):
    prompt, sizes = CASES[case]
    images = _images(*sizes)
    inputs = hf_inputs(prompt, images)
    ours = _ours(pipe, prompt, images)
    assert ours.prompt_token_ids == inputs["input_ids"][0].tolist()
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")} if images else {}
    ref = _hf_generate(qwen3_hf, inputs["input_ids"], **extra)
    assert ours.token_ids == ref[:len(ours.token_ids)]
    assert len(ours.token_ids) == NEW_TOKENS or ours.finish_reason == "eos"


def _first_logits(pipe, prompt, images, deepstack=True) -> np.ndarray:
    """The prefill's last-position logits through the runtime's own stages (vision, embeddings, DeepStack)."""
    row = pipe.prepare(prompt, images)
    image_features, _ = pipe.encode_vision(row)
    embeds = pipe.embed(row.input_ids, [f.embeds for f in image_features])
    levels = pipe.deepstack(row.input_ids, [f.deepstack for f in image_features])
    ids = row.input_ids[None]
    positions, deltas = pipe.positions(ids, np.ones_like(ids), row.grids)
    stack = levels[:, None] if deepstack else np.zeros_like(levels[:, None])
    outputs = prefill(pipe.decoder, pipe.new_cache(1), Prompt(embeds[None], ids, positions, deltas,
                                                             np.array([ids.shape[1]]), stack))
    return HostOutputs(outputs)[names.LOGITS][0]


def test_first_step_logits_match_and_depend_on_deepstack(pipe, qwen3_hf, hf_inputs):
    """fp32 to 1e-4 against transformers' forward; the same call with DeepStack zeroed is far off (the runtime
    really feeds each level to its decoder layer)."""
    prompt, images = "Describe it.", _images((300, 400))
    inputs = hf_inputs(prompt, images)
    ids = inputs["input_ids"]
    types = (ids == qwen3_hf.config.image_token_id).int()
    with torch.no_grad():
        ref = qwen3_hf(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits[0, -1]
    ref = ref.numpy()
    ours = _first_logits(pipe, prompt, images)
    scale = float(np.abs(ref).max())
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, scale)
    dropped = _first_logits(pipe, prompt, images, deepstack=False)
    assert np.abs(dropped - ref).max() > 0.02 * scale


def test_video_with_timestamps_equals_transformers(pipe, qwen3_hf):
    """A 6-frame clip (3 temporal patches): each patch announced by its time and positioned as its own grid."""
    frames = synthetic_frames(6, 96, 128)
    clip = VideoClip(frames, 3.0, 6, np.arange(6))
    ours = _ours(pipe, "What happens in the video?", videos=[clip])
    text = pipe.tokenizer.decode(ours.prompt_token_ids, skip_special_tokens=False)
    assert "<0.2 seconds><|vision_start|><|video_pad|>" in text and "<0.8 seconds><|vision_start|>" in text and "<1.5 seconds><|vision_start|>" in text
    assert text.count("<|vision_start|>") == 3 and text.count("<|vision_end|>") == 3
    (video,) = pipe.video_patches([clip])
    assert video.grid[0] == 3 and video.timestamps == pytest.approx((1 / 6, 5 / 6, 3 / 2))
    ids = torch.tensor([ours.prompt_token_ids])
    ref = _hf_generate(qwen3_hf, ids, pixel_values_videos=torch.from_numpy(video.pixel_values),
                       video_grid_thw=torch.tensor([video.grid]))
    assert ours.token_ids == ref[:len(ours.token_ids)]


def test_batch_scheduler_and_chat_give_the_pipelines_tokens(pipe):
    """DeepStack rows travel with chunked prefills on a shared cache and with a chat's cached prefix."""
    from edgevl.runtime.chat import ChatSession
    from edgevl.serve.scheduler.batching import make_scheduler
    from edgevl.serve.scheduler.jobs import Job
    images = _images((300, 400))
    alone = _ours(pipe, "What is in this picture?", images)
    if pipe.decoder_spec.kv_cache == names.IN_PLACE:
        scheduler = make_scheduler(pipe, max_batch=2, max_queue=2, prefill_chunk=16)
        try:
            jobs = [scheduler.submit(Job(lambda: pipe.prepare("What is in this picture?", images),
                                         pipe.decoding(NEW_TOKENS, do_sample=False, repetition_penalty=1.0)))
                    for _ in range(2)]
            assert [j.future.result(timeout=120).token_ids for j in jobs] == [alone.token_ids] * 2
        finally:
            scheduler.close()
    chat = ChatSession(pipe)
    first = chat.send("What is in this picture?", images=images, max_new_tokens=NEW_TOKENS, do_sample=False,
                      repetition_penalty=1.0)
    assert first.token_ids == alone.token_ids
    second = chat.send("And its colours?", max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
    assert chat.last_prefill_tokens < len(second.prompt_token_ids)        # the first turn came from the cache
    fresh = pipe.generate_prepared([pipe.prepare_messages(chat.messages[:-1], images)],
                                   pipe.decoding(4, do_sample=False, repetition_penalty=1.0))[0]
    assert (second.prompt_token_ids, second.token_ids) == (fresh.prompt_token_ids, fresh.token_ids)


def test_a_video_file_is_sampled_and_sized_as_qwen3_vls_processor_does(pipe, video_file):
    """16 frames at 8 fps -> transformers' Qwen3-VL sampling (4 frames at linspace, no pair flooring) and its
    whole-clip pixel budget; decoded frame by frame, only those frames."""
    from edgevl.runtime.inputs import qwen3_vl_video as q3
    from edgevl.runtime.inputs.video import probe_video
    video = probe_video(video_file)
    plan = pipe.plan_messages([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
                              videos=[video])
    (vp,) = plan.video_plans
    assert vp.indices.tolist() == q3.sample_frame_indices(16, 8.0).tolist() == [0, 5, 10, 15]
    s = pipe.video_settings
    assert vp.grid == q3.video_grid(4, 84, 112, s.min_pixels, s.max_pixels)
    row = pipe.prepare_plan(plan)
    assert row.video_grids == [vp.grid] and len(row.video_timestamps[0]) == vp.grid[0]
    assert len(row.input_ids) == plan.tokens                      # the plan counted the timestamps' text too


def test_a_long_video_is_fitted_to_the_context_with_its_timestamps(pipe, monkeypatch):
    """Ten minutes at 30 fps against a 1024-token context: fewer, smaller frames; the prompt fits exactly as
    planned; too small a context for two frames is refused with the numbers."""
    from edgevl.runtime.inputs.budget import FrameSampling, PromptTooLong, VideoMeta
    from edgevl.runtime.inputs.video import VideoInput
    monkeypatch.setattr(pipe, "max_context", 1024)
    video = VideoInput(b"", VideoMeta(1280, 720, 18000, 30.0), FrameSampling())
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    plan = pipe.plan_messages(messages, videos=[video])
    (vp,) = plan.video_plans
    assert vp.fitted and plan.tokens < 1024 and len(vp.indices) < vp.sampled
    monkeypatch.setattr(pipe, "max_context", 40)
    with pytest.raises(PromptTooLong, match="context"):
        pipe.plan_messages(messages, videos=[video])


@pytest.mark.parametrize("recipe", ["fp16", "int8", "w4a16"])
def test_quantized_qwen3_artifacts_calibrate_on_the_new_inputs_and_run(recipe, qwen3_artifact, tmp_path):
    """Calibration runs the fp32 pipeline (the learned position table's rows, DeepStack) and every recipe writes an
    artifact the runtime runs with an image; fp16 keeps fp32's first greedy tokens."""
    from edgevl.artifact import load_artifact
    if load_artifact(qwen3_artifact).manifest.graph(names.DECODER).variant != "ort":
        pytest.skip("the recipes are checked once, on the ort export")
    from edgevl.calibrate.options import QuantizeOptions
    from edgevl.calibrate.quantize import quantize
    options = QuantizeOptions(recipe, samples=3, eval_samples=2, new_tokens=4, calib_steps=2, progress=False,
                              force=True, **({"block_size": 32} if recipe == "w4a16" else {}))
    report = quantize(qwen3_artifact, tmp_path / recipe, options, None, log=lambda m: None, table=lambda t: None)
    assert report["graphs"]["vision"]["metrics"]["images"] > 0        # scored on vision feeds with pos_embed inputs
    quantized = Pipeline.load(tmp_path / recipe)
    images = _images((300, 400))
    result = quantized.generate("What is in this picture?", images=images, max_new_tokens=4, do_sample=False)
    assert 1 <= len(result.token_ids) <= 4
    if recipe == "fp16":
        fp32 = Pipeline.load(qwen3_artifact).generate("What is in this picture?", images=images, max_new_tokens=4,
                                                      do_sample=False)
        assert result.token_ids[:2] == fp32.token_ids[:2]


def test_an_image_and_a_video_in_one_message_equal_transformers(pipe, qwen3_hf):
    """Positions run through the image's grid, the video's timestamp text and its patches' grids in order."""
    images = _images((123, 457))
    clip = VideoClip(synthetic_frames(4, 64, 96), 2.0, 4, np.arange(4))
    ours = _ours(pipe, "Compare the picture with the video.", images, [clip])
    row = pipe.prepare("Compare the picture with the video.", images, [clip])
    assert row.input_ids.tolist() == ours.prompt_token_ids
    ids = torch.tensor([ours.prompt_token_ids])
    ref = _hf_generate(qwen3_hf, ids, pixel_values=torch.from_numpy(row.pixel_values[0]),
                       image_grid_thw=torch.tensor(row.grids), pixel_values_videos=torch.from_numpy(row.video_pixel_values[0]),
                       video_grid_thw=torch.tensor(row.video_grids))
    assert ours.token_ids == ref[:len(ours.token_ids)]


def test_the_openai_server_serves_qwen3_vl(pipe):
    """An image request through `edgevl serve` gives the pipeline's own greedy tokens (its text)."""
    import base64
    import io

    import httpx

    from edgevl.serve.app import create_app
    from tests.serve_helpers import running
    image = _images((300, 400))[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    alone = _ours(pipe, "What is in this picture?", [image])
    body = {"model": "qwen3", "max_tokens": NEW_TOKENS, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]}]}
    with running(create_app(pipe, "qwen3")) as base:
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text[:300]
    data = reply.json()
    assert data["choices"][0]["message"]["content"] == alone.text
    assert data["usage"]["prompt_tokens"] == len(alone.prompt_token_ids)
