"""Video input: decode with PyAV, sample at a target fps, resize and patchify like transformers.

Qwen2-VL sees a video as `t` temporal patches of 2 frames (an image is the same
with two identical frames). transformers' Qwen2VLVideoProcessor:
  * samples `total / source_fps * fps` frames (clamped to [min_frames, max_frames]
    and to the frame count, floored to a multiple of temporal_patch_size) at
    indices arange(0, total, total / n),
  * resizes every frame to one smart_resize size (multiples of 28, within the
    video processor's min/max pixels), rescales and normalizes,
  * pads the frame count to a multiple of temporal_patch_size by repeating the
    last frame, and flattens [t, h, w] patches in merge-block order.
We do the same with PIL and numpy. transformers resizes video frames with
torchvision (antialiased bicubic on uint8), PIL's bicubic differs by at most a
grey level or so; frames already at the target size are bit-identical.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.extras import requires
from edgevl.runtime.image_processing import (
    ImageProcessorSettings,
    patchify,
    rescale_normalize,
    smart_resize,
)

# Qwen2VLVideoProcessor's class defaults, used when a model ships no video settings.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768


@dataclass(frozen=True)
class VideoClip:
    """Sampled RGB frames [N, H, W, 3] uint8 and where they came from."""

    frames: np.ndarray
    source_fps: float
    total_frames: int
    indices: np.ndarray

    @property
    def sampled_fps(self) -> float:
        """Frames kept per second of video (transformers' VideoMetadata.sampled_fps)."""
        return len(self.indices) / self.total_frames * self.source_fps if self.total_frames else self.source_fps


def video_settings(image: ImageProcessorSettings, d: dict | None) -> ImageProcessorSettings:
    """Pixel settings for video frames: the image ones with the video processor's pixel budget."""
    d = d or {}
    size = d.get("size") or {}
    return replace(image,
                   min_pixels=int(d.get("min_pixels", size.get("shortest_edge", VIDEO_MIN_PIXELS))),
                   max_pixels=int(d.get("max_pixels", size.get("longest_edge", VIDEO_MAX_PIXELS))))


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


class VideoTooLarge(EdgevlError):
    """The video's frames have more pixels than the caller allows (`load_video(max_pixels=...)`)."""


def load_video(path, fps: float = DEFAULT_FPS, max_frames: int = MAX_FRAMES, temporal_patch_size: int = 2,
               min_frames: int = MIN_FRAMES, max_pixels: int | None = None, label: str | None = None,
               settings: ImageProcessorSettings | None = None) -> VideoClip:
    """Decode a video file and keep the frames sampled at `fps` (PyAV, the `video` extra).

    max_pixels: refuse frames larger than this (VideoTooLarge) before keeping any: sampled frames are
    held at full size until preprocessing, so a small file of huge frames could exhaust memory.
    label: how error messages name the video (default "Video file 'PATH'"; a server's temporary file
    name means nothing to its client).
    settings: resize each kept frame as it is decoded, exactly as `preprocess_video` would later
    (the same smart_resize and PIL bicubic per frame), so memory holds frames at model size, not
    at source size (768 sampled 4K frames are ~19 GB; resized, a few hundred MB).
    """
    with requires("video", "video input"):
        import av
    path = os.fspath(path)
    name = label or f"Video file {path!r}"
    if not os.path.isfile(path):
        raise EdgevlError(f"{name} does not exist or is not a file.")
    if fps <= 0:
        raise EdgevlError(f"--fps must be positive, not {fps}.")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, max_pixels, name)
            source_fps = float(stream.average_rate or 0)
            # The container's frame count, as transformers reads it; count by decoding if it has none.
            total = stream.frames or sum(1 for _ in container.decode(video=0))
            if not total or not source_fps:
                raise EdgevlError(f"{name} has no decodable frames or no frame rate.")
            indices = sample_frame_indices(total, source_fps, fps, temporal_patch_size, min_frames, max_frames)
            container.seek(0)
            wanted, kept = set(indices.tolist()), {}
            for i, frame in enumerate(container.decode(video=0)):   # keep only sampled frames in memory
                if i in wanted:
                    _check_frame_size(frame.width, frame.height, max_pixels, name)  # the size may change
                    rgb = frame.to_ndarray(format="rgb24")
                    kept[i] = resize_frame(rgb, settings) if settings is not None else rgb
                if i >= indices[-1]:
                    break
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise EdgevlError(f"{name} could not be decoded ({type(e).__name__}).") from None
    if len(kept) != len(wanted):
        raise EdgevlError(f"{name} has fewer decodable frames than its header says.")
    return VideoClip(np.stack([kept[i] for i in indices.tolist()]), source_fps, total, indices)


def _check_frame_size(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoTooLarge(f"{name} has {width}x{height} frames; at most {max_pixels} pixels per frame "
                            f"are accepted.")


def resize_frame(frame: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    """One uint8 frame [H, W, 3] at the model's size (smart_resize, PIL bicubic); unchanged when already
    there, so resizing twice (while decoding, then in preprocess_video) is the same as once."""
    height, width = frame.shape[:2]
    if not settings.do_resize:
        return frame
    h, w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    if (h, w) == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC))


def preprocess_video(frames: np.ndarray, settings: ImageProcessorSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [N, H, W, 3] -> (pixel_values float32 [t*h*w, C*T*P*P], grid (t, h, w))."""
    n = len(frames)
    first = frames[0]
    if resize_frame(first, settings) is not first:   # frames share one size; decoded ones are already at
        frames = np.stack([resize_frame(f, settings) for f in frames])   # model size: no copy for them
    x = rescale_normalize(frames, settings)                                   # [N, H, W, C] float32
    tp = settings.temporal_patch_size
    if pad := -n % tp:                                                          # repeat the last frame
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return patchify(x, settings)
