"""Qwen3-VL video arithmetic in numpy, equal to transformers 5.x `Qwen3VLVideoProcessor` / `Qwen3VLProcessor`.

Where Qwen3-VL differs from Qwen2-VL (budget.py's `sample_frame_indices`, image_processing's `smart_resize`):

* frames: `int(total / source_fps * fps)` clamped to [min_frames, max_frames] and to the frame count, NOT floored
  to a multiple of the temporal patch size (an odd count is padded with the last frame when patchified), at
  `np.linspace(0, total - 1, n).round()` (numpy rounds halves to even); no source fps means 24;
* timestamps: each sampled index / source fps, the index list padded with its last entry to a multiple of the
  temporal patch size, then the mean of the first and last frame of every temporal patch (what the prompt
  shows before each patch, `<{t:.1f} seconds>`: see qwen3_vl_prompt.py);
* frame size: the pixel budget (`size.shortest_edge` / `size.longest_edge`) counts ALL frames
  (t_bar * h * w with t_bar the frame count rounded to the temporal patch size), sides under 32 px are scaled
  up first, and transformers' optional per-frame cap (`cap_pixels_per_frame`, off by default in 5.25 with a
  warning) can lower it.

Checked against transformers' recorded outputs in tests/runtime/inputs/test_qwen3_vl_video.py
(tests/data/qwen3_vl_reference.npz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import FrameSampling, PromptTooLong, VideoMeta, VideoPlan

# Qwen3VLVideoProcessor's class defaults (the hub's video_preprocessor_config.json has the same).
DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
UNKNOWN_SOURCE_FPS = 24.0      # what transformers assumes when a video has no frame rate
MAX_VIDEO_TOKENS = 768         # per frame, for cap_pixels_per_frame (qwen-vl-utils' VIDEO_MAX_TOKEN_NUM)


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise EdgevlError(f"{name} must be a positive number, not {value!r}.")
    return value


def sample_frame_indices(total_frames: int, source_fps: float | None, fps: float = DEFAULT_FPS,
                         min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """`Qwen3VLVideoProcessor.sample_frames(metadata, fps=fps)` -> int64 source frame indices [n], ascending."""
    if isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise EdgevlError(f"A video needs at least one frame; its frame count is {total_frames!r}.")
    source_fps = UNKNOWN_SOURCE_FPS if source_fps is None else _positive(source_fps, "The video's frame rate")
    _positive(fps, "fps")
    if min_frames < 1 or max_frames < 1:
        raise EdgevlError(f"min_frames and max_frames must be at least 1, not {min_frames} and {max_frames}.")
    total = int(total_frames)
    n = int(total / source_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def frame_timestamps(indices, source_fps: float | None, temporal_patch_size: int = 2) -> list[float]:
    """Seconds shown before each temporal patch: `Qwen3VLProcessor._calculate_timestamps` (one per patch)."""
    source_fps = UNKNOWN_SOURCE_FPS if source_fps is None else _positive(source_fps, "The video's frame rate")
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not indices:
        raise EdgevlError("A video needs at least one sampled frame to have timestamps.")
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [i / source_fps for i in indices]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(seconds), temporal_patch_size)]


def frame_pixel_budget(num_frames: int, min_pixels: int, max_pixels: int, factor: int = 32,
                       cap_pixels_per_frame: bool = False, max_video_tokens: int = MAX_VIDEO_TOKENS) -> int:
    """The total-pixel ceiling the resize works under: `size.longest_edge`, or with transformers'
    `cap_pixels_per_frame` min(max_video_tokens * factor^2, longest_edge // frames), at least
    1.05 * shortest_edge, per frame, times the frame count."""
    if not cap_pixels_per_frame:
        return max_pixels
    per_frame = max(min(max_video_tokens * factor * factor, max_pixels // num_frames), int(min_pixels * 1.05))
    return per_frame * num_frames


def resized_frame_size(num_frames: int, height: int, width: int, min_pixels: int, max_pixels: int,
                       factor: int = 32, temporal_factor: int = 2) -> tuple[int, int]:
    """(height, width) every frame is resized to: the video processor's `smart_resize`.

    min_pixels / max_pixels bound t_bar * h * w over the whole clip (`size.shortest_edge` / `size.longest_edge`,
    or `frame_pixel_budget` for the capped variant)."""
    if num_frames < temporal_factor:
        raise EdgevlError(f"A video needs at least {temporal_factor} frames; this one has {num_frames}.")
    if height < 1 or width < 1:
        raise EdgevlError(f"A video frame of {width}x{height} pixels is empty.")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise EdgevlError(f"A video frame's aspect ratio must be under 200:1; {width}x{height} is not.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_grid(num_frames: int, height: int, width: int, min_pixels: int, max_pixels: int, patch_size: int = 16,
               merge_size: int = 2, temporal_patch_size: int = 2, cap_pixels_per_frame: bool = False,
               max_video_tokens: int = MAX_VIDEO_TOKENS) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of `num_frames` sampled frames of height x width: `video_grid_thw`."""
    factor = patch_size * merge_size
    budget = frame_pixel_budget(num_frames, min_pixels, max_pixels, factor, cap_pixels_per_frame, max_video_tokens)
    h, w = resized_frame_size(num_frames, height, width, min_pixels, budget, factor, temporal_patch_size)
    return -(-num_frames // temporal_patch_size), h // patch_size, w // patch_size


# ----------------------------------------------------------------------------- planning against the context
@dataclass(frozen=True)
class ClipPixels:
    """Qwen3-VL's FramePlanner (budget.py): frames at `linspace`, all of them resized within one pixel budget over
    the whole clip, each temporal patch announced by its timestamp. `text_tokens(timestamps)`: the tokens of the
    text around a video's patches (timestamps, vision start / end), from the model's tokenizer.

    A video that does not fit `budget` tokens is fitted the way the processor's own budget works: a smaller
    total-pixel budget first (frames get smaller together, down to the processor's minimum), then fewer frames
    (sampled over the whole video), refused only when two frames at the smallest size do not fit."""

    settings: ImageProcessorSettings
    text_tokens: Callable[[list[float]], int]

    def plan(self, meta: VideoMeta, sampling: FrameSampling, budget: int | None = None) -> VideoPlan:
        plan = self._plan(meta, sampling, sampling.max_frames, self.settings.max_pixels)
        if budget is None or plan.tokens <= budget:
            return plan
        frames = len(plan.indices)
        while frames >= self.settings.temporal_patch_size:
            fitted = self._fit_pixels(meta, sampling, frames, budget)
            if fitted is not None:
                return replace(fitted, sampled=plan.sampled, fitted=True)
            frames //= 2
        least = self.smallest(meta)
        raise PromptTooLong(f"the video needs at least {least} tokens (2 frames at the smallest size) but only "
                            f"{budget} are left in the context.", least, budget)

    def smallest(self, meta: VideoMeta) -> int:
        s = self.settings
        return self._plan(meta, FrameSampling(max_frames=s.temporal_patch_size), s.temporal_patch_size,
                          s.min_pixels).tokens

    def _fit_pixels(self, meta: VideoMeta, sampling: FrameSampling, frames: int, budget: int) -> VideoPlan | None:
        """The largest total-pixel budget whose plan of `frames` frames fits `budget` tokens, or None."""
        s = self.settings
        low, high = s.min_pixels, s.max_pixels
        best = None
        for _ in range(40):                          # bisection over the pixel budget: a few dozen steps at most
            if low > high:
                break
            mid = (low + high) // 2
            plan = self._plan(meta, sampling, frames, mid)
            if plan.tokens <= budget:
                best, low = plan, mid + 1
            else:
                high = mid - 1
        return best

    def _plan(self, meta: VideoMeta, sampling: FrameSampling, max_frames: int, max_pixels: int) -> VideoPlan:
        s = self.settings
        indices = sample_frame_indices(meta.total_frames, meta.source_fps, sampling.fps,
                                       min(sampling.min_frames, max_frames), max_frames)
        if len(indices) < s.temporal_patch_size:     # transformers' processor refuses a one-frame video too
            raise EdgevlError(f"the video has {meta.total_frames} frame(s); at least {s.temporal_patch_size} are "
                              f"needed.")
        h, w = resized_frame_size(len(indices), meta.height, meta.width, min(s.min_pixels, max_pixels), max_pixels,
                                  s.factor, s.temporal_patch_size)
        # The frames are resized once, while they are decoded; the per-frame settings keep them at that size.
        exact = replace(s, min_pixels=min(s.min_pixels, h * w), max_pixels=h * w)
        times = frame_timestamps(indices, meta.source_fps, s.temporal_patch_size)
        return VideoPlan(indices, (h, w), exact, len(indices), text_tokens=self.text_tokens(times))
