"""Qwen3-VL frame sampling, timestamps, frame sizes and video prompt text against transformers' recorded outputs.

transformers' Qwen3VLVideoProcessor needs torchvision, which the test environment does not install: its outputs
(and Qwen3VLProcessor's expanded prompts) are in tests/data/qwen3_vl_reference.npz, written by
tests/data/make_qwen3_vl_reference.py from the inputs in tests/data/qwen3_vl_cases.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.prompt import expand_vision_pads
from edgevl.runtime.inputs.qwen3_vl_prompt import expand_video_placeholders, timestamp_text, video_prompt
from edgevl.runtime.inputs.qwen3_vl_video import (
    frame_timestamps,
    resized_frame_size,
    sample_frame_indices,
    video_grid,
)
from edgevl.runtime.inputs.template import ChatTemplate

DATA = Path(__file__).parents[2] / "data"
sys.path.insert(0, str(DATA))
from qwen3_vl_cases import (  # noqa: E402
    CHAT_IMAGE,
    CHAT_MESSAGES,
    CHAT_VIDEO,
    HUB_VIDEO_SIZE,
    IMAGE_CASES,
    PROMPT_CASES,
    SAMPLING_CASES,
    VIDEO_GRID_CASES,
    VIDEO_PIXEL_CASES,
)

REFERENCE = np.load(DATA / "qwen3_vl_reference.npz")
ASSET_TEMPLATE = Path(__file__).parents[3] / "edgevl" / "synthetic" / "assets" / "qwen3_vl_chat_template.jinja"
MERGE, PATCH, TEMPORAL = 2, 16, 2


def hub_grid(frames: int, height: int, width: int, size=HUB_VIDEO_SIZE, cap: bool = False):
    return video_grid(frames, height, width, size["shortest_edge"], size["longest_edge"], PATCH, MERGE, TEMPORAL,
                      cap_pixels_per_frame=cap)


@pytest.mark.parametrize("case", range(len(SAMPLING_CASES)))
def test_sampling_and_timestamps_match_transformers(case):
    total, source_fps, fps = SAMPLING_CASES[case]
    indices = sample_frame_indices(total, source_fps, fps)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, REFERENCE[f"sampling/{case}/indices"])
    times = frame_timestamps(indices, source_fps, TEMPORAL)
    assert times == REFERENCE[f"sampling/{case}/timestamps"].tolist()          # bit for bit
    assert [timestamp_text(t) for t in times] == REFERENCE[f"sampling/{case}/text"].tolist()


def test_sampling_edge_cases_are_what_transformers_does():
    # fewer frames than min_frames: all of them; an odd count is not floored to pairs (Qwen2-VL's is)
    assert sample_frame_indices(3, 30.0).tolist() == [0, 1, 2]
    assert frame_timestamps([0, 1, 2], 30.0) == [(0 + 1 / 30) / 2, (2 / 30 + 2 / 30) / 2]
    # np.round halves to even: linspace(0, 10, 5) = [0, 2.5, 5, 7.5, 10]
    assert sample_frame_indices(11, 4.0).tolist() == [0, 2, 5, 8, 10]
    assert len(sample_frame_indices(216000, 30.0)) == 768
    assert timestamp_text(0.25) == "<0.2 seconds>" and timestamp_text(1.25) == "<1.2 seconds>"


@pytest.mark.parametrize("bad", [dict(total_frames=0, source_fps=30.0), dict(total_frames=10, source_fps=0.0),
                                 dict(total_frames=10, source_fps=float("nan")),
                                 dict(total_frames=10, source_fps=30.0, fps=-1.0)])
def test_bad_sampling_arguments_are_one_sentence(bad):
    with pytest.raises(EdgevlError):
        sample_frame_indices(**bad)


@pytest.mark.parametrize("name", sorted(VIDEO_PIXEL_CASES))
def test_frame_sizes_match_transformers(name):
    (frames, height, width), size = VIDEO_PIXEL_CASES[name]
    grid = hub_grid(frames, height, width, size)
    assert grid == tuple(REFERENCE[f"video/{name}/grid"][0])
    levels = REFERENCE[f"video/{name}/levels"]
    assert levels.shape == (grid[0] * grid[1] * grid[2], 3 * TEMPORAL * PATCH * PATCH)


@pytest.mark.parametrize("name", sorted(VIDEO_GRID_CASES))
def test_pixel_budget_over_all_frames_matches_transformers(name):
    (frames, height, width), cap = VIDEO_GRID_CASES[name]
    assert hub_grid(frames, height, width, cap=bool(cap)) == tuple(REFERENCE[f"video_grid/{name}"][0])


def test_pixel_budget_counts_every_frame():
    # the same 1080p frames get smaller as the clip gets longer; a per-frame budget would not change them
    sizes = [resized_frame_size(n, 1080, 1920, 4096, HUB_VIDEO_SIZE["longest_edge"]) for n in (2, 8, 64, 768)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == (1088, 1920) and sizes[-1][0] < 200
    with pytest.raises(EdgevlError, match="at least 2 frames"):
        resized_frame_size(1, 64, 64, 4096, HUB_VIDEO_SIZE["longest_edge"])    # transformers raises too
    with pytest.raises(EdgevlError, match="aspect ratio"):
        resized_frame_size(4, 32, 32 * 201, 4096, HUB_VIDEO_SIZE["longest_edge"])


@pytest.mark.parametrize("case", range(len(PROMPT_CASES)))
def test_video_prompt_text_matches_the_processor(case):
    total, source_fps, height, width = PROMPT_CASES[case]
    indices = sample_frame_indices(total, source_fps)
    grid = hub_grid(len(indices), height, width)
    assert grid == tuple(REFERENCE[f"prompt/{case}/grid"][0])
    text = expand_video_placeholders("A<|vision_start|><|video_pad|><|vision_end|>B",
                                     [(grid, frame_timestamps(indices, source_fps))], MERGE)
    assert text == str(REFERENCE[f"prompt/{case}/text"])


def test_chat_with_image_and_video_matches_the_processor():
    template = str(REFERENCE["chat/template"])
    assert json.loads(str(REFERENCE["chat/messages"])) == CHAT_MESSAGES
    rendered = ChatTemplate(template).render(CHAT_MESSAGES, add_generation_prompt=True)
    assert rendered == str(REFERENCE["chat/rendered"])
    image_grid = tuple(REFERENCE["chat/image_grid"][0])
    assert IMAGE_CASES["hub_upscale"][0] == CHAT_IMAGE
    assert image_grid == tuple(REFERENCE["image/hub_upscale/grid"][0])
    total, source_fps, height, width = CHAT_VIDEO
    indices = sample_frame_indices(total, source_fps)
    grid = hub_grid(len(indices), height, width)
    text = expand_vision_pads(rendered, "<|image_pad|>", [image_grid], MERGE)
    text = expand_video_placeholders(text, [(grid, frame_timestamps(indices, source_fps))], MERGE)
    assert text == str(REFERENCE["chat/expanded"])
    assert "<|vision_start|><0.3 seconds>" not in text and "<0.3 seconds><|vision_start|>" in text


def test_recorded_template_is_the_synthetic_checkpoints_template():
    assert ASSET_TEMPLATE.read_text(encoding="utf-8") == str(REFERENCE["chat/template"])


def test_video_prompt_refuses_mismatches():
    with pytest.raises(EdgevlError, match="3 timestamps"):
        video_prompt((3, 4, 4), [0.5, 1.5], MERGE)
    with pytest.raises(EdgevlError, match="2 video placeholders but 1"):
        expand_video_placeholders("<|vision_start|><|video_pad|><|vision_end|> and <|video_pad|>",
                                  [((1, 2, 2), [0.0])], MERGE)
    # a bare pad is a placeholder too, as in transformers
    assert expand_video_placeholders("x<|video_pad|>y", [((1, 2, 2), [0.25])], MERGE) == \
        "x<0.2 seconds><|vision_start|><|video_pad|><|vision_end|>y"
