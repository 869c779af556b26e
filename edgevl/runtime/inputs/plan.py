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

from edgevl.runtime.inputs.budget import PromptCost, VideoPlan, fit_prompt, grid_tokens, image_grid, plan_video, resized
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
    units = pipe.tokenize_messages(messages, [(1, merge, merge)] * n_images,
                                   [(1, video_merge, video_merge)] * n_videos, tools)
    image_tokens = [grid_tokens(g, merge) for g in prior_grids]
    image_tokens += [grid_tokens(image_grid(i.width, i.height, pipe.image_settings), merge) for i in images]
    fixed = [grid_tokens(g, video_merge) for g in prior_video_grids]
    fixed += [grid_tokens(clip_grid(v, pipe.video_settings), video_merge) for v in videos if isinstance(v, VideoClip)]
    cost = PromptCost(len(units) - n_images - n_videos, tuple(image_tokens), tuple(fixed))
    wanted = [(v.meta, v.sampling) for v in videos if isinstance(v, VideoInput)]
    fitted = iter(fit_prompt(pipe.max_context, cost, wanted, pipe.video_settings))
    plans = [None if isinstance(v, VideoClip) else next(fitted) for v in videos]
    return InputPlan(list(messages), images, videos, plans, cost.total + sum(p.tokens for p in plans if p), tools)


def decode_inputs(pipe, plan: InputPlan) -> tuple[list[tuple[np.ndarray, Grid]], list[tuple[np.ndarray, Grid, float]]]:
    """A plan's images -> (pixel_values, grid) each; its videos -> (pixel_values, grid, seconds per temporal
    patch) each. One image or video is decoded at a time, a video's planned frames only."""
    return (image_patches(pipe, plan.images),
            [video_patch(pipe, v, p) for v, p in zip(plan.videos, plan.video_plans)])


def image_patches(pipe, images) -> list[tuple[np.ndarray, Grid]]:
    return [preprocess_image(image, pipe.image_settings) for image in images]


def video_patches(pipe, videos) -> list[tuple[np.ndarray, Grid, float]]:
    """Videos without a token budget (each as the video processor alone would sample it)."""
    videos = [as_video(v) for v in videos]
    return [video_patch(pipe, v, None if isinstance(v, VideoClip) else plan_video(v.meta, pipe.video_settings,
                                                                                  v.sampling)) for v in videos]


def video_patch(pipe, video, plan: VideoPlan | None) -> tuple[np.ndarray, Grid, float]:
    clip = video if isinstance(video, VideoClip) else read_frames(video, plan)
    pixel_values, grid = preprocess_video(clip.frames, clip.settings or pipe.video_settings)
    return pixel_values, grid, pipe.video_settings.temporal_patch_size / clip.sampled_fps


def as_video(video):
    """A path becomes a VideoInput (its header read, sampled at 2 fps); VideoInputs and VideoClips stay."""
    return video if isinstance(video, (VideoClip, VideoInput)) else probe_video(video)


def clip_grid(clip: VideoClip, settings) -> Grid:
    """The grid `preprocess_video` will give a decoded clip."""
    settings = clip.settings or settings
    h, w = resized(*clip.frames.shape[1:3], settings)
    return -(-len(clip.frames) // settings.temporal_patch_size), h // settings.patch_size, w // settings.patch_size
