"""A conversation's images and videos: their cost planned from headers (budget.py), then decoded one at a time.

    plan = plan_inputs(pipe, messages, images, videos)   # headers only; PromptTooLong when it cannot fit
    images, videos = decode_inputs(pipe, plan)             # pixels, only what the plan keeps

`pipe` is a Pipeline (its settings, context and tokenizer); nothing here runs a graph. Images are paths, bytes,
PIL images or `ImageInput`s (`read_image_header`); videos are paths, `VideoInput`s (`probe_video`: a server's
bytes, `--fps`, `--max-frames`) or already decoded `VideoClip`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.runtime.inputs.budget import PromptCost, VideoPlan, fit_prompt, grid_tokens, image_grid, resized
from edgevl.runtime.inputs.qwen3_vl_video import frame_timestamps
from edgevl.runtime.inputs.image_loading import ImageInput, read_image_header
from edgevl.runtime.inputs.image_processing import preprocess_image
from edgevl.runtime.inputs.video import VideoClip, VideoInput, preprocess_video, probe_video, read_frames

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class InputPlan:
    """A conversation whose cost is known and fits the context, nothing decoded yet."""

    messages: list[dict]
    images: list[ImageInput]                  # the new images, headers read
    videos: list                              # the new videos: VideoInput (undecoded) or VideoClip
    video_plans: list[VideoPlan | None]       # per video: its frames and their size; None for a VideoClip
    tokens: int                               # the prompt's length
    tools: list[dict] | None = None           # function definitions for the chat template


def plan_inputs(pipe, messages: list[dict], images=(), videos=(), tools: list[dict] | None = None,
                prior_grids: list[Grid] = (), prior_video_grids: list[Grid] = ()) -> InputPlan:
    """What the conversation will cost, from the images' and videos' headers alone, checked against the context
    (videos that do not fit get fewer or smaller frames); PromptTooLong with the numbers otherwise.

    prior_grids / prior_video_grids: the grids of the first images and videos of `messages`, already encoded
    (an earlier chat turn's)."""
    images = [read_image_header(image) for image in images]
    videos = [as_video(v) for v in videos]
    merge, video_merge = pipe.image_settings.merge_size, pipe.video_settings.merge_size
    n_images, n_videos = len(prior_grids) + len(images), len(prior_video_grids) + len(videos)
    # One pad per image and video: the text's own tokens (a pad is one special token however many there are).
    # Timestamped videos (Qwen3-VL) stand in as one patch at 0 s; the plan counts every patch's own text.
    units = pipe.tokenize_messages(messages, [(1, merge, merge)] * n_images,
                                   [(1, video_merge, video_merge)] * n_videos, tools, [[0.0]] * n_videos)
    image_tokens = [grid_tokens(g, merge) for g in prior_grids]
    image_tokens += [grid_tokens(image_grid(i.width, i.height, pipe.image_settings), merge) for i in images]
    fixed = [grid_tokens(g, video_merge) for g in prior_video_grids]
    fixed += [grid_tokens(clip_grid(v, pipe.video_settings), video_merge) for v in videos if isinstance(v, VideoClip)]
    stand_in = pipe.video_text_tokens([0.0])
    cost = PromptCost(len(units) - n_images - n_videos * (1 + stand_in), tuple(image_tokens), tuple(fixed))
    wanted = [(v.meta, v.sampling) for v in videos if isinstance(v, VideoInput)]
    fitted = iter(fit_prompt(pipe.max_context, cost, wanted, pipe.frame_planner))
    plans = [None if isinstance(v, VideoClip) else next(fitted) for v in videos]
    return InputPlan(list(messages), images, videos, plans, cost.total + sum(p.tokens for p in plans if p), tools)


def decode_inputs(pipe, plan: InputPlan) -> tuple[list[tuple[np.ndarray, Grid]], list["VideoPatches"]]:
    """A plan's images -> (pixel_values, grid) each; its videos -> VideoPatches each. One image or video is
    decoded at a time, a video's planned frames only."""
    return (image_patches(pipe, plan.images),
            [video_patch(pipe, v, p) for v, p in zip(plan.videos, plan.video_plans)])


def image_patches(pipe, images) -> list[tuple[np.ndarray, Grid]]:
    return [preprocess_image(image, pipe.image_settings) for image in images]


@dataclass(frozen=True)
class VideoPatches:
    """One decoded video, ready for the vision encoder and the prompt."""

    pixel_values: np.ndarray                  # [t*h*w, C*T*P*P]
    grid: Grid
    seconds: float                            # per temporal patch (Qwen2.5-VL's video time ids)
    timestamps: tuple[float, ...]             # each temporal patch's time in the video (Qwen3-VL's prompt text)


def video_patches(pipe, videos) -> list[VideoPatches]:
    """Videos without a token budget (each as the video processor alone would sample it)."""
    videos = [as_video(v) for v in videos]
    return [video_patch(pipe, v, None if isinstance(v, VideoClip) else pipe.frame_planner.plan(v.meta, v.sampling))
            for v in videos]


def video_patch(pipe, video, plan: VideoPlan | None) -> VideoPatches:
    clip = video if isinstance(video, VideoClip) else read_frames(video, plan)
    pixel_values, grid = preprocess_video(clip.frames, clip.settings or pipe.video_settings)
    tp = pipe.video_settings.temporal_patch_size
    return VideoPatches(pixel_values, grid, tp / clip.sampled_fps,
                        tuple(frame_timestamps(clip.indices, clip.source_fps, tp)))


def as_video(video):
    """A path becomes a VideoInput (its header read, sampled at 2 fps); VideoInputs and VideoClips stay."""
    return video if isinstance(video, (VideoClip, VideoInput)) else probe_video(video)


def clip_grid(clip: VideoClip, settings) -> Grid:
    """The grid `preprocess_video` will give a decoded clip."""
    settings = clip.settings or settings
    h, w = resized(*clip.frames.shape[1:3], settings)
    return -(-len(clip.frames) // settings.temporal_patch_size), h // settings.patch_size, w // settings.patch_size
