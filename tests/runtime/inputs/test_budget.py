"""The token budget (runtime/inputs/budget.py): every image's and video's cost from headers and sampling arithmetic, long
videos fitted the way qwen-vl-utils fits them, prompts that cannot fit refused with their numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edgevl.runtime.inputs.budget import (
    FrameSampling,
    PerFramePixels,
    PromptCost,
    PromptTooLong,
    VideoMeta,
    fit_prompt,
    grid_tokens,
    image_grid,
    plan_video,
    resized,
    sample_frame_indices,
)
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.image_processing import smart_resize
from edgevl.runtime.inputs.video import video_settings

VIDEO = video_settings(ImageProcessorSettings(), None)      # Qwen2-VL's video processor: 128..768 tokens per frame pair
TEN_MINUTES_720P = VideoMeta(1280, 720, 18000, 30.0)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def test_a_video_that_fits_keeps_the_video_processors_frames_and_size():
    meta = VideoMeta(1280, 720, 300, 30.0)
    plan = plan_video(meta, VIDEO, FrameSampling(), budget=10**6)
    np.testing.assert_array_equal(plan.indices, sample_frame_indices(300, 30.0, 2.0))
    assert plan.size == smart_resize(720, 1280, 28, VIDEO.min_pixels, VIDEO.max_pixels)
    assert plan.settings == VIDEO and not plan.fitted
    assert plan.grid == (10, plan.size[0] // 14, plan.size[1] // 14)
    assert plan.tokens == 10 * plan.size[0] * plan.size[1] // 28 ** 2


def test_over_budget_frames_shrink_first_as_in_qwen_vl_utils():
    full = plan_video(TEN_MINUTES_720P, VIDEO)
    assert len(full.indices) == 768 and full.tokens > 100_000           # 10 min at 2 fps, capped by max_frames
    budget = 384 * 300                                                   # 300 tokens per frame pair
    plan = plan_video(TEN_MINUTES_720P, VIDEO, budget=budget)
    np.testing.assert_array_equal(plan.indices, full.indices)           # the same frames, smaller
    # qwen-vl-utils' fetch_video: max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), min_pixels)
    qwen_max = max(min(VIDEO.max_pixels, budget * 28 * 28 / 768 * 2), VIDEO.min_pixels)
    assert plan.size == smart_resize(720, 1280, 28, VIDEO.min_pixels, int(qwen_max))
    assert plan.fitted and plan.tokens <= budget and plan.size[0] * plan.size[1] > VIDEO.min_pixels


def test_then_fewer_frames_over_the_whole_video():
    plan = plan_video(TEN_MINUTES_720P, VIDEO, budget=4000)
    smallest = resized(720, 1280, VIDEO, VIDEO.min_pixels)
    per_pair = smallest[0] * smallest[1] // 28 ** 2
    assert plan.size == smallest and len(plan.indices) == 2 * (4000 // per_pair)
    np.testing.assert_array_equal(plan.indices, sample_frame_indices(18000, 30.0, 2.0, max_frames=len(plan.indices)))
    assert plan.indices[0] == 0 and plan.indices[-1] > 0.95 * 18000      # spread over all ten minutes
    assert plan.tokens <= 4000 and plan.sampled == 768


def test_refused_when_two_frames_at_the_smallest_do_not_fit():
    with pytest.raises(PromptTooLong) as e:
        plan_video(TEN_MINUTES_720P, VIDEO, budget=100)
    assert "100 are left" in str(e.value) and one_sentence(str(e.value))


@pytest.mark.parametrize("sampling", [FrameSampling(fps=0.5), FrameSampling(max_frames=16), FrameSampling(fps=0.1, max_frames=6)])
def test_fitting_never_exceeds_what_fps_and_max_frames_ask(sampling):
    free = plan_video(TEN_MINUTES_720P, VIDEO, sampling)
    fitted = plan_video(TEN_MINUTES_720P, VIDEO, sampling, budget=free.tokens // 3)
    assert len(fitted.indices) <= len(free.indices) <= sampling.max_frames
    assert set(fitted.indices.tolist()) <= set(range(18000)) and fitted.tokens <= free.tokens // 3


@pytest.mark.parametrize("bad", [dict(fps=float("nan")), dict(fps=0), dict(fps=float("inf")), dict(max_frames=1)])
def test_sampling_values_are_checked(bad):
    with pytest.raises(Exception, match="--fps|--max-frames"):
        FrameSampling(**bad)


def test_random_videos_and_budgets_hold_every_rule():
    rng = random.Random(0)
    settings = [VIDEO, ImageProcessorSettings(min_pixels=3136, max_pixels=12845056), ImageProcessorSettings()]
    for _ in range(400):
        w, h = rng.randint(28, 4000), rng.randint(28, 4000)
        if max(w, h) / min(w, h) > 150:
            continue
        meta = VideoMeta(w, h, rng.randint(2, 40000), rng.choice([1.0, 8.0, 24.0, 29.97, 60.0]))
        s = rng.choice(settings)
        sampling = FrameSampling(rng.choice([0.5, 1.0, 2.0, 4.0]), rng.randint(2, 1000))
        budget = rng.randint(1, 60000)
        try:
            plan = plan_video(meta, s, sampling, budget)
        except PromptTooLong as e:
            assert e.tokens > budget
            continue
        n = len(plan.indices)
        assert plan.tokens <= budget and n % 2 == 0 and 2 <= n <= sampling.max_frames
        assert np.all(np.diff(plan.indices) > 0) and plan.indices[-1] < meta.total_frames
        assert plan.size[0] % 28 == 0 and plan.size[1] % 28 == 0
        assert resized(*plan.size, plan.settings) == plan.size          # preprocessing keeps the planned size
        if n < plan.sampled:            # fewer frames only when one more pair at the smallest size would not fit
            smallest = resized(h, w, s, s.min_pixels)
            assert (n // 2 + 1) * (smallest[0] * smallest[1] // 28 ** 2) > budget


def test_videos_share_what_is_left_evenly():
    short, long = VideoMeta(112, 84, 16, 8.0), TEN_MINUTES_720P
    cost = PromptCost(text=40, images=(1000,))
    plans = fit_prompt(8192, cost, [(short, FrameSampling()), (long, FrameSampling()), (long, FrameSampling())],
                       PerFramePixels(VIDEO))
    assert not plans[0].fitted                                  # the short one fits as it is
    assert plans[1].tokens == plans[2].tokens                   # the two long ones get equal shares
    assert cost.total + sum(p.tokens for p in plans) <= 8191    # one position left for a new token
    assert sum(p.tokens for p in plans) > 0.9 * (8191 - cost.total)


def test_a_prompt_that_cannot_fit_is_refused_with_its_numbers():
    with pytest.raises(PromptTooLong) as e:
        fit_prompt(32768, PromptCost(text=109, images=(16384,) * 40), [], PerFramePixels(VIDEO))
    message = str(e.value)
    assert message.startswith("the prompt needs 655469 tokens (109 of text, 655360 for 40 images) but the model's "
                              "context is 32768 tokens") and one_sentence(message)
    with pytest.raises(PromptTooLong, match=r"at least 32\d\d\d tokens .* for 1 video cut to 2 frames"):
        fit_prompt(32768, PromptCost(text=20, images=(32700,)), [(TEN_MINUTES_720P, FrameSampling())],
                   PerFramePixels(VIDEO))
    assert fit_prompt(32768, PromptCost(text=32767), [], PerFramePixels(VIDEO)) == []   # exactly one position left: fits


def test_an_images_tokens_do_not_depend_on_its_orientation():
    s = ImageProcessorSettings()
    for w, h in [(4032, 3024), (1001, 333), (28, 5000), (640, 480)]:
        assert grid_tokens(image_grid(w, h, s), 2) == grid_tokens(image_grid(h, w, s), 2)
