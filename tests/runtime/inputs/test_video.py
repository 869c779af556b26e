"""Video: frame sampling, preprocessing, decoding and generation against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.video import (
    VideoClip,
    VideoTooLarge,
    load_video,
    preprocess_video,
    sample_frame_indices,
)
from tests.data.video_frames import SAMPLING_CASES, SETTINGS, synthetic_frames, write_video

REFERENCE = np.load(Path(__file__).parents[2] / "data" / "video_reference.npz")


@pytest.mark.parametrize("case", range(len(SAMPLING_CASES)))
def test_frame_sampling_matches_transformers(case):
    total, source_fps, fps = SAMPLING_CASES[case]
    np.testing.assert_array_equal(sample_frame_indices(total, source_fps, fps), REFERENCE[f"sampling/{case}"])


def test_preprocessing_matches_transformers_when_no_resize():
    """Frames already at a multiple of 28: pixel_values equal transformers' video processor."""
    shape, budget = SETTINGS["no_resize"]
    pv, grid = preprocess_video(synthetic_frames(*shape), ImageProcessorSettings(**budget))
    assert grid == tuple(REFERENCE["no_resize/grid"][0])
    # transformers fuses rescale and normalize in float32: equal up to float rounding
    np.testing.assert_allclose(pv, REFERENCE["no_resize/pixel_values"], rtol=0, atol=1e-6)


def test_preprocessing_close_to_transformers_when_resized():
    """transformers resizes video with torchvision, we with PIL: same size, pixels within ~a grey level."""
    shape, budget = SETTINGS["resized_odd"]
    pv, grid = preprocess_video(synthetic_frames(*shape), ImageProcessorSettings(**budget))
    ref = REFERENCE["resized_odd/pixel_values"]
    assert grid == tuple(REFERENCE["resized_odd/grid"][0])
    assert grid[0] == 3                                   # 5 frames padded to 6: three temporal patches
    one_grey_level = 1 / 255 / min(ImageProcessorSettings().image_std)
    diff = np.abs(pv - ref)
    assert diff.mean() < 0.1 * one_grey_level
    assert np.quantile(diff, 0.999) <= 2.01 * one_grey_level


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    pytest.importorskip("av")
    write_video(path, frames, fps)


def test_load_video_decodes_and_samples_at_2_fps(tmp_path):
    frames = synthetic_frames(24, 56, 84)
    _write_video(tmp_path / "clip.mov", frames, fps=8)
    clip = load_video(tmp_path / "clip.mov")
    np.testing.assert_array_equal(clip.indices, sample_frame_indices(24, 8.0, 2.0))
    np.testing.assert_array_equal(clip.frames, frames[clip.indices])
    assert clip.source_fps == 8.0 and clip.total_frames == 24


def test_bad_video_files(tmp_path):
    from edgevl.errors import EdgevlError
    with pytest.raises(EdgevlError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(EdgevlError, match="junk.mp4"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(EdgevlError, match="^the upload could not be decoded") as e:   # a caller's name for it
        load_video(tmp_path / "junk.mp4", label="the upload")
    assert "junk.mp4" not in str(e.value)


def test_frames_over_max_pixels_are_refused(video_file):
    with pytest.raises(VideoTooLarge, match="112x84 frames"):
        load_video(video_file, max_pixels=112 * 84 - 1)
    assert len(load_video(video_file, max_pixels=112 * 84).frames) == 4


def _hf_ids(tiny_model_dir, content, image_grids=(), video_grids=()):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    for pad, grids in (("<|image_pad|>", image_grids), ("<|video_pad|>", video_grids)):
        for grid in grids:
            text = text.replace(pad, "<|placeholder|>" * (int(np.prod(grid)) // 4), 1)
        text = text.replace("<|placeholder|>", pad)
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("with_image", [False, True])
def test_video_generation_equals_transformers(with_image, any_pipeline, hf_model, tiny_model_dir, photos):
    pipeline = any_pipeline
    frames = synthetic_frames(8, 84, 112)
    clip = VideoClip(frames, 2.0, 8, np.arange(8))
    images = [photos["coffee"]] if with_image else []
    ours = pipeline.generate("What happens in the video?", images=images, videos=[clip], max_new_tokens=16,
                             do_sample=False)
    row = pipeline.prepare("What happens in the video?", images=images, videos=[clip])
    content = [{"type": "image"}] * len(images) + [{"type": "video"},
                                                   {"type": "text", "text": "What happens in the video?"}]
    ids = _hf_ids(tiny_model_dir, content, row.grids, row.video_grids)
    assert ours.prompt_token_ids == ids[0].tolist()
    video_tokens = int((ids == hf_model.config.video_token_id).sum())
    assert video_tokens == 4 * (84 // 28) * (112 // 28)         # t=4 temporal patches of 3x4 merged tokens
    token_types = (ids == hf_model.config.image_token_id).int() + 2 * (ids == hf_model.config.video_token_id).int()
    extra = {"pixel_values_videos": torch.from_numpy(row.video_pixel_values[0]),
             "video_grid_thw": torch.tensor(row.video_grids)}
    if images:
        extra.update(pixel_values=torch.from_numpy(row.pixel_values[0]), image_grid_thw=torch.tensor(row.grids))
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=token_types,
                                max_new_tokens=16, do_sample=False, **extra)[0, ids.shape[1]:].tolist()
    eos = pipeline.config.eos_token_id
    expected = ref[:next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    assert ours.token_ids == expected


def test_video_positions_match_get_rope_index(pipeline, hf_model):
    clip = VideoClip(synthetic_frames(6, 56, 84), 2.0, 6, np.arange(6))
    row = pipeline.prepare("Describe.", videos=[clip])
    ids = row.input_ids[None]
    ours, deltas = pipeline.positions(ids, np.ones_like(ids), [], row.video_grids)
    tids = torch.from_numpy(ids)
    ref, ref_deltas = hf_model.model.get_rope_index(
        tids, mm_token_type_ids=2 * (tids == hf_model.config.video_token_id).int(),
        video_grid_thw=torch.tensor(row.video_grids))
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())
    assert len(np.unique(ours[0, 0][ids[0] == hf_model.config.video_token_id])) == 3   # temporal ids advance


def test_frames_resized_while_decoding_give_the_same_pixel_values(tmp_path):
    pytest.importorskip("av")
    from edgevl.runtime.inputs.video import load_video, preprocess_video, video_settings
    settings = video_settings(ImageProcessorSettings(), None)
    path = tmp_path / "odd.mov"
    write_video(path, synthetic_frames(12, 100, 150), fps=6)          # 100x150: not a multiple of 28
    full = load_video(path, temporal_patch_size=settings.temporal_patch_size)
    small = load_video(path, temporal_patch_size=settings.temporal_patch_size, settings=settings)
    assert full.frames.shape[1:3] == (100, 150) and small.frames.shape[1:3] != (100, 150)
    assert small.frames.shape[1] % settings.factor == 0 and small.frames.shape[2] % settings.factor == 0
    (a, grid_a), (b, grid_b) = preprocess_video(full.frames, settings), preprocess_video(small.frames, settings)
    assert grid_a == grid_b and np.array_equal(a, b)
