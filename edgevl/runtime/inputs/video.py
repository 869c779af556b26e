"""Video input: read the header with PyAV, plan the frames (budget.py), decode only those, resize, patchify.

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

`probe_video` reads only the container's header (frame size, count and rate; a container without a frame
count has its packets counted, nothing decoded), so a prompt's cost is known before decoding; `read_frames`
then decodes frame by frame and keeps only the planned ones, already resized: memory holds what the model
will see, never the clip.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.extras import requires
from edgevl.runtime.inputs.budget import (
    DEFAULT_FPS,
    MAX_FRAMES,
    MIN_FRAMES,
    FrameSampling,
    VideoMeta,
    VideoPlan,
    plan_video,
    sample_frame_indices,
)
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.image_processing import patchify, rescale_normalize, smart_resize

# Qwen2VLVideoProcessor's class defaults, used when a model ships no video settings.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


@dataclass(frozen=True)
class VideoClip:
    """Sampled RGB frames [N, H, W, 3] uint8 and where they came from. `settings`: the processor settings
    the frames were resized for (a fitted plan's), None for frames at their source size."""

    frames: np.ndarray
    source_fps: float
    total_frames: int
    indices: np.ndarray
    settings: ImageProcessorSettings | None = None

    @property
    def sampled_fps(self) -> float:
        """Frames kept per second of video (transformers' VideoMetadata.sampled_fps)."""
        return len(self.indices) / self.total_frames * self.source_fps if self.total_frames else self.source_fps


@dataclass(frozen=True)
class VideoInput:
    """A video whose header has been read and whose frames are not decoded yet: a path or the file's bytes."""

    source: str | bytes = field(repr=False)
    meta: VideoMeta
    sampling: FrameSampling = FrameSampling()
    max_pixels: int | None = None           # per frame; larger frames are refused (VideoTooLarge)
    name: str = "the video"                 # how error messages name it


def video_settings(image: ImageProcessorSettings, d: dict | None) -> ImageProcessorSettings:
    """Pixel settings for video frames: the image ones with the video processor's pixel budget."""
    from dataclasses import replace
    d = d or {}
    size = d.get("size") or {}
    return replace(image,
                   min_pixels=int(d.get("min_pixels", size.get("shortest_edge", VIDEO_MIN_PIXELS))),
                   max_pixels=int(d.get("max_pixels", size.get("longest_edge", VIDEO_MAX_PIXELS))))


class VideoTooLarge(EdgevlError):
    """The video's frames have more pixels than the caller allows (`max_pixels`)."""


def probe_video(source, fps: float = DEFAULT_FPS, max_frames: int = MAX_FRAMES, min_frames: int = MIN_FRAMES,
                max_pixels: int | None = None, label: str | None = None) -> VideoInput:
    """A path or a video file's bytes -> VideoInput, from the container's header alone (PyAV, the `video` extra).

    max_pixels: refuse frames larger than this (VideoTooLarge). label: how error messages name the video
    (default "Video file 'PATH'" or "the video"; a server's temporary name means nothing to its client).
    """
    sampling = FrameSampling(fps, max_frames, min_frames)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source, name = bytes(source), label or "the video"
    else:
        source = os.fspath(source)
        name = label or f"Video file {source!r}"
        if not os.path.isfile(source):
            raise EdgevlError(f"{name} does not exist or is not a file.")
    with _opened(source, name) as (av, container):
        try:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            _check_frame_size(width, height, max_pixels, name)
            # The average rate, as transformers reads it; FFmpeg's guess where a container leaves it out (MPEG-TS).
            source_fps = float(stream.average_rate or stream.guessed_rate or 0)
            # The container's frame count, as transformers reads it; without one, its packets counted (not decoded).
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except (av.error.FFmpegError, IndexError, ValueError) as e:
            raise EdgevlError(f"{name} could not be decoded ({type(e).__name__}).") from None
    if not total or not source_fps or not width or not height:
        raise EdgevlError(f"{name} has no decodable frames, no frame size or no frame rate.")
    return VideoInput(source, VideoMeta(width, height, total, source_fps), sampling, max_pixels, name)


def read_frames(video: VideoInput, plan: VideoPlan) -> VideoClip:
    """Decode `video` frame by frame, keeping only `plan.indices`, each resized to `plan.size` as it arrives."""
    return _read(video, plan.indices, plan.size, plan.settings)


def load_video(path, fps: float = DEFAULT_FPS, max_frames: int = MAX_FRAMES, temporal_patch_size: int = 2,
               min_frames: int = MIN_FRAMES, max_pixels: int | None = None, label: str | None = None,
               settings: ImageProcessorSettings | None = None) -> VideoClip:
    """Decode a video file (or its bytes) and keep the frames sampled at `fps`, without a token budget.

    settings: resize each kept frame as it is decoded, exactly as `preprocess_video` would later, so memory
    holds frames at model size; None keeps them at their source size. Pipelines plan against their context
    instead (`Pipeline.prepare` with a path or a `probe_video` result).
    """
    video = probe_video(path, fps, max_frames, min_frames, max_pixels, label)
    if settings is not None:
        return read_frames(video, plan_video(video.meta, settings, video.sampling))
    m = video.meta
    indices = sample_frame_indices(m.total_frames, m.source_fps, fps, temporal_patch_size, min_frames, max_frames)
    return _read(video, indices, None, None)


def _read(video: VideoInput, indices: np.ndarray, size: tuple[int, int] | None,
          settings: ImageProcessorSettings | None) -> VideoClip:
    wanted = {int(i): k for k, i in enumerate(indices)}
    last, name = int(indices[-1]), video.name
    kept: np.ndarray | list = np.empty((len(indices), *size, 3), np.uint8) if size else [None] * len(indices)
    seen = 0
    with _opened(video.source, name) as (av, container):
        try:
            for i, frame in enumerate(container.decode(video=0)):
                seen = i + 1
                if i in wanted:
                    _check_frame_size(frame.width, frame.height, video.max_pixels, name)  # the size may change
                    kept[wanted[i]] = _frame(frame, size)
                if i >= last:
                    break
        except (av.error.FFmpegError, IndexError, ValueError) as e:
            raise EdgevlError(f"{name} could not be decoded ({type(e).__name__}).") from None
    if seen <= last:
        raise EdgevlError(f"{name} ends after {seen} decodable frames though its header announces "
                          f"{video.meta.total_frames}; it may be truncated.")
    frames = kept if size else np.stack(kept)
    return VideoClip(frames, video.meta.source_fps, video.meta.total_frames, np.asarray(indices), settings)


def _frame(frame, size: tuple[int, int] | None) -> np.ndarray:
    """One decoded frame as uint8 [H, W, 3], resized to size (height, width) with PIL's bicubic when given."""
    rgb = frame.to_ndarray(format="rgb24")
    if size is None or rgb.shape[:2] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BICUBIC))


class _opened:
    """`with _opened(source, name) as (av, container)`: PyAV's container for a path or bytes, errors as sentences."""

    def __init__(self, source: str | bytes, name: str):
        self.source, self.name, self.container = source, name, None

    def __enter__(self):
        with requires("video", "video input"):
            import av
        source = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        try:
            self.container = av.open(source)
        except (av.error.FFmpegError, ValueError) as e:
            raise EdgevlError(f"{self.name} could not be decoded ({type(e).__name__}).") from None
        return av, self.container

    def __exit__(self, *exc):
        self.container.close()
        return False


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
    """uint8 frames [N, H, W, 3] -> (pixel_values float32 [t*h*w, C*T*P*P], grid (t, h, w)).

    One temporal patch at a time into the output: memory is the output and the frames, no float copy of the clip.
    """
    first = resize_frame(frames[0], settings)
    tp, p = settings.temporal_patch_size, settings.patch_size
    t, gh, gw = -(-len(frames) // tp), first.shape[0] // p, first.shape[1] // p
    out = None
    for k in range(t):
        group = [resize_frame(f, settings) for f in frames[k * tp:(k + 1) * tp]]
        group += [group[-1]] * (tp - len(group))                            # repeat the last frame
        patches, _ = patchify(rescale_normalize(np.stack(group), settings), settings)
        if out is None:
            out = np.empty((t * len(patches), patches.shape[1]), np.float32)
        out[k * len(patches):(k + 1) * len(patches)] = patches
    return out, (t, gh, gw)
