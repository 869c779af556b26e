"""Qwen3-VL's video prompt text, equal to transformers 5.x `Qwen3VLProcessor`.

The chat template puts `<|vision_start|><|video_pad|><|vision_end|>` where a video goes. Qwen3VLProcessor
replaces that whole wrapper (or a bare `<|video_pad|>`) with one block per temporal patch, each preceded by its
timestamp (qwen3_vl_video.frame_timestamps):

    <0.3 seconds><|vision_start|><|video_pad|>*(h*w/merge^2)<|vision_end|><1.4 seconds><|vision_start|>...

so no vision_start / vision_end pair encloses the whole video, and the temporal patches are separate runs of
video pads (get_rope_index gives each t = 1: rope_index.qwen3_vl_mrope_position_ids). Images expand as in
Qwen2-VL (prompt.expand_vision_pads).
"""

from __future__ import annotations

import re

from edgevl.errors import EdgevlError

VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
VIDEO_WRAPPER = VISION_START + VIDEO_PAD + VISION_END
_PLACEHOLDER = re.compile(f"{re.escape(VIDEO_WRAPPER)}|{re.escape(VIDEO_PAD)}")


def timestamp_text(seconds: float) -> str:
    """`<{seconds:.1f} seconds>` (Python's rounding: 0.25 -> '0.2')."""
    return f"<{seconds:.1f} seconds>"


def video_prompt(grid_thw, timestamps, merge_size: int) -> str:
    """The text that replaces one video's placeholder: per temporal patch, its timestamp, then vision_start,
    h*w/merge^2 video pads, vision_end. `timestamps` has one entry per temporal patch (grid_thw[0])."""
    t, h, w = (int(v) for v in grid_thw)
    if len(timestamps) != t:
        raise EdgevlError(f"A video of {t} temporal patches needs {t} timestamps, not {len(timestamps)}.")
    if h % merge_size or w % merge_size:
        raise EdgevlError(f"Video grid {h}x{w} is not divisible by the merge size {merge_size}.")
    pads = VIDEO_PAD * (h * w // merge_size ** 2)
    return "".join(timestamp_text(s) + VISION_START + pads + VISION_END for s in timestamps)


def expand_video_placeholders(text: str, videos: list[tuple[tuple[int, int, int], list[float]]],
                              merge_size: int) -> str:
    """Replace the i-th video placeholder of `text` (the template's wrapper, or a bare `<|video_pad|>`) with
    `video_prompt(*videos[i], merge_size)`, as Qwen3VLProcessor does before tokenizing."""
    found = len(_PLACEHOLDER.findall(text))
    if found != len(videos):
        raise EdgevlError(f"The prompt has {found} video placeholders but {len(videos)} videos were given.")
    replacements = iter([video_prompt(grid, times, merge_size) for grid, times in videos])
    return _PLACEHOLDER.sub(lambda _: next(replacements), text)
