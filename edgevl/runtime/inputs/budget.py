"""The token budget: what every image and video costs, known from headers and sampling arithmetic alone.

One rule for every entry point (`run`, `chat`, `serve`, Triton, the Python API), applied before any pixel is
decoded: a prompt is its text tokens plus, per image, t*h*w/merge^2 tokens of its smart_resize grid and, per
video, the same over the frames sampling keeps; it must leave one position of the context for a new token
(`Pipeline.max_context`; `max_new_tokens` is clamped to what is left, never counted here).

Images are never shrunk to fit: a prompt whose text and images alone do not fit is refused. A video that does not
fit is fitted the way Qwen's own tooling does (qwen-vl-utils' `fetch_video`: at most `total_pixels / nframes * 2`
pixels per frame, never under `min_pixels`), the total being the tokens the prompt has left:
  1. the frames sampling picks at the requested fps (`--fps`, `--max-frames`), each made smaller, down to the
     video processor's `min_pixels`;
  2. if that is still too many tokens, fewer frames (sampled over the whole video as a lower `--max-frames`
     would), as large as the budget then allows;
  3. refused when even one temporal patch (2 frames) at `min_pixels` does not fit.
Several videos share what is left evenly (one that needs less leaves the rest to the others). A video that fits
as it is keeps transformers' frames and sizes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.image_processing import smart_resize

# Qwen2VLVideoProcessor's sampling defaults.
DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768


class PromptTooLong(EdgevlError):
    """A prompt that cannot fit the context even with its videos at their smallest: `tokens` at the least."""

    def __init__(self, message: str, tokens: int, context: int):
        super().__init__(message)
        self.tokens, self.context = tokens, context


@dataclass(frozen=True)
class FrameSampling:
    """How a video is sampled: `fps` frames per second, at most `max_frames` and at least `min_frames` (the
    video's own frame count permitting), as transformers' Qwen2VLVideoProcessor."""

    fps: float = DEFAULT_FPS
    max_frames: int = MAX_FRAMES
    min_frames: int = MIN_FRAMES

    def __post_init__(self):
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise EdgevlError(f"--fps must be a positive number, not {self.fps}.")
        if self.max_frames < 2:
            raise EdgevlError(f"--max-frames must be at least 2 (one pair of frames), not {self.max_frames}.")


@dataclass(frozen=True)
class VideoMeta:
    """What a video's header says: frame size, frame count and frame rate."""

    width: int
    height: int
    total_frames: int
    source_fps: float


def sample_frame_indices(total: int, source_fps: float, fps: float, temporal_patch_size: int = 2,
                         min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """transformers' `Qwen2VLVideoProcessor.sample_frames` for an fps target -> int indices [n]."""
    max_frames = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = total / source_fps * fps
    n = min(max(n, min_frames), max_frames, total)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    if n <= 0:
        raise EdgevlError(f"the video has {total} frames; at least {temporal_patch_size} are needed.")
    # torch.arange(0, total, total / n).int() computes in float32
    return np.arange(0, total, np.float32(total / n), dtype=np.float32).astype(np.int64)[:n]


def resized(height: int, width: int, settings: ImageProcessorSettings, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) after the processor's resize (smart_resize; unchanged with do_resize off)."""
    if not settings.do_resize:
        return height, width
    return smart_resize(height, width, settings.factor, settings.min_pixels,
                        settings.max_pixels if max_pixels is None else max_pixels)


def image_grid(width: int, height: int, settings: ImageProcessorSettings) -> tuple[int, int, int]:
    """The (1, h, w) patch grid of an image of this size."""
    h, w = resized(height, width, settings)
    return 1, h // settings.patch_size, w // settings.patch_size


def grid_tokens(grid: tuple[int, int, int], merge_size: int) -> int:
    """Vision tokens (pads in the prompt) of a (t, h, w) grid."""
    t, h, w = grid
    return t * h * w // merge_size ** 2


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video are kept and at what size."""

    indices: np.ndarray                     # source frame numbers, in order
    size: tuple[int, int]                   # (height, width) of every kept frame
    settings: ImageProcessorSettings        # the processor settings for these frames: `size` stays as it is
    sampled: int                            # frames the sampling alone asked for (more once fitted)
    fitted: bool = False                    # fewer or smaller frames than the video processor alone gives
    text_tokens: int = 0                    # Qwen3-VL: the timestamps and vision start / end around each patch

    @property
    def grid(self) -> tuple[int, int, int]:
        tp, p = self.settings.temporal_patch_size, self.settings.patch_size
        return -(-len(self.indices) // tp), self.size[0] // p, self.size[1] // p

    @property
    def tokens(self) -> int:
        return grid_tokens(self.grid, self.settings.merge_size) + self.text_tokens


class FramePlanner(Protocol):
    """How a model family samples and sizes a video's frames: `plan` (fitted to `budget` tokens when given,
    PromptTooLong when it cannot be) and `smallest` (the fewest tokens a video can cost)."""

    def plan(self, meta: VideoMeta, sampling: FrameSampling, budget: int | None = None) -> VideoPlan: ...
    def smallest(self, meta: VideoMeta) -> int: ...


@dataclass(frozen=True)
class PerFramePixels:
    """Qwen2-VL / Qwen2.5-VL: frames sampled in pairs at `fps`, each resized within the per-frame pixel bounds
    (`plan_video`, `smallest_video_tokens`)."""

    settings: ImageProcessorSettings

    def plan(self, meta: VideoMeta, sampling: FrameSampling, budget: int | None = None) -> VideoPlan:
        return plan_video(meta, self.settings, sampling, budget)

    def smallest(self, meta: VideoMeta) -> int:
        return smallest_video_tokens(meta, self.settings)


def plan_video(meta: VideoMeta, settings: ImageProcessorSettings, sampling: FrameSampling = FrameSampling(),
               budget: int | None = None) -> VideoPlan:
    """The frames to keep and their size; fitted to `budget` tokens when given (see the module docstring).
    PromptTooLong when not even one temporal patch at min_pixels fits."""
    indices = _indices(meta, settings, sampling, sampling.max_frames)
    size = resized(meta.height, meta.width, settings)
    plan = VideoPlan(indices, size, settings, len(indices))
    if budget is None or plan.tokens <= budget:
        return plan
    smallest = resized(meta.height, meta.width, settings, settings.min_pixels)
    tp, f2 = settings.temporal_patch_size, settings.factor ** 2
    per_patch = smallest[0] * smallest[1] // f2
    patches = min(len(indices) // tp, budget // per_patch)
    if patches < 1:
        raise PromptTooLong(f"the video needs at least {per_patch} tokens (2 frames of {smallest[1]}x{smallest[0]}) "
                            f"but only {budget} are left in the context.", per_patch, budget)
    if patches * tp < len(indices):
        indices = _indices(meta, settings, sampling, patches * tp)
    pixels = max(settings.min_pixels, min(settings.max_pixels, budget // patches * f2))
    size = resized(meta.height, meta.width, settings, pixels)
    if patches * (size[0] * size[1] // f2) > budget:
        size = smallest
    exact = replace(settings, min_pixels=min(settings.min_pixels, size[0] * size[1]), max_pixels=size[0] * size[1])
    return VideoPlan(indices, size, exact, plan.sampled, fitted=True)


def _indices(meta: VideoMeta, settings: ImageProcessorSettings, sampling: FrameSampling, max_frames: int) -> np.ndarray:
    return sample_frame_indices(meta.total_frames, meta.source_fps, sampling.fps, settings.temporal_patch_size,
                                sampling.min_frames, max_frames)


def smallest_video_tokens(meta: VideoMeta, settings: ImageProcessorSettings) -> int:
    """Tokens of one temporal patch at min_pixels: the least a video can cost."""
    h, w = resized(meta.height, meta.width, settings, settings.min_pixels)
    return h * w // settings.factor ** 2


@dataclass(frozen=True)
class PromptCost:
    """What a prompt costs before its videos are fitted: tokens of text (template, text, special tokens),
    per image, and per video whose frames are already fixed (decoded clips, earlier chat turns)."""

    text: int
    images: tuple[int, ...] = ()
    fixed_videos: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.text + sum(self.images) + sum(self.fixed_videos)


def fit_prompt(context: int, cost: PromptCost, videos: list[tuple[VideoMeta, FrameSampling]],
               planner: FramePlanner) -> list[VideoPlan]:
    """A plan per video such that the whole prompt leaves one position of `context` free; PromptTooLong with
    the numbers when even the videos' smallest form does not fit."""
    free = context - 1 - cost.total
    plans = [planner.plan(meta, sampling) for meta, sampling in videos]
    if sum(p.tokens for p in plans) <= free:
        return plans
    least = [planner.smallest(meta) for meta, _ in videos]
    if sum(least) > free:
        raise _too_long(context, cost, least)
    shares = _shares(free, least, [p.tokens for p in plans])
    return [planner.plan(meta, sampling, share) for (meta, sampling), share in zip(videos, shares)]


def _shares(free: int, least: list[int], wanted: list[int]) -> list[int]:
    """Tokens per video: an even level (water-filling), each at least `least` and at most `wanted`, summing to
    at most `free` (given sum(least) <= free)."""
    def used(level: int) -> int:
        return sum(max(lo, min(hi, level)) for lo, hi in zip(least, wanted))
    low, high = 0, free
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if used(mid) <= free else (low, mid - 1)
    return [max(lo, min(hi, low)) for lo, hi in zip(least, wanted)]


def _too_long(context: int, cost: PromptCost, least_videos: list[int]) -> PromptTooLong:
    parts = [f"{cost.text} of text"]
    if cost.images:
        parts.append(f"{sum(cost.images)} for {_count(len(cost.images), 'image')}")
    if cost.fixed_videos:
        parts.append(f"{sum(cost.fixed_videos)} for {_count(len(cost.fixed_videos), 'video')}")
    if least_videos:
        parts.append(f"{sum(least_videos)} for {_count(len(least_videos), 'video')} cut to 2 frames each at "
                     f"the smallest size")
    need = cost.total + sum(least_videos)
    what = "at least " if least_videos else ""
    return PromptTooLong(f"the prompt needs {what}{need} tokens ({', '.join(parts)}) but the model's context is "
                         f"{context} tokens; shorten it or use fewer or smaller images or shorter videos.",
                         need, context)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"
