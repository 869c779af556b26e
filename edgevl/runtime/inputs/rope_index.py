"""Rotary position ids for Qwen2-VL, in numpy, equal to transformers 5.x.

* `vision_rotary_position_ids`: the (row, col) ids the vision tower rotates
  by (`transformers.vision_utils.get_vision_position_ids`, one image).
* `mrope_position_ids`: 3D (temporal, height, width) ids for the language
  model prefill (`Qwen2VLModel.get_rope_index`) and the per-row deltas that
  continue them during decoding.
* `qwen3_vl_mrope_position_ids`: the same for Qwen3-VL (`Qwen3VLModel.get_rope_index`): every video split
  into its temporal patches (t = 1 each, separated in the prompt by their timestamps). Qwen3-VL's interleaved
  M-RoPE (`mrope_interleaved`) changes only how the rotary tables pick t/h/w frequencies, not these ids.
* `text_position_ids`: the ids of tokens generated after the prefill, from each row's real
  length (what the generation loop uses, for left- and right-padded caches alike);
  `decode_position_ids` is the same in transformers' terms (cache length and mask).
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import EdgevlError

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values used by the transformers processor


def vision_rotary_position_ids(grid_thw: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, col) of every patch, in merge-block order: int64 [t*h*w, 2].

    Patches are laid out [block_row, block_col, row_in_block, col_in_block]
    (the order the image processor emits), the same ids for each of the t frames.
    """
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise EdgevlError(f"Vision grid {h}x{w} is not divisible by the merge size {merge_size}.")
    rows, cols = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")  # [h, w]
    block = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # [h*w]
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # [h*w]
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))  # [t*h*w, 2]


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """Per-token modality like the processor builds it: text 0, image 1, video 2. Same shape as input_ids."""
    types = np.zeros_like(input_ids, dtype=np.int64)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values in a 1-D array: [(value, start, end)].

    Like transformers' `itertools.groupby`, two placeholders of the same kind
    with nothing between them form ONE run (real prompts always have
    vision_start/vision_end tokens between them).
    """
    if len(types) == 0:
        return []
    starts = np.flatnonzero(np.diff(types)) + 1
    bounds = [0, *starts.tolist(), len(types)]
    return [(int(types[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _vision_block(start: int, grid_thw, merge_size: int, interval=None) -> np.ndarray:
    """3D ids of one image/video's merged tokens: int64 [3, t * (h/m) * (w/m)].

    Each axis counts from `start`; the temporal id advances by 1 per temporal patch (Qwen2-VL), or by
    `interval` (Qwen2.5-VL videos: tokens_per_second x seconds per temporal patch), truncated like
    transformers' `(arange(t) * interval).long()` in float32.
    """
    t, h, w = (int(v) for v in grid_thw)
    temporal = np.arange(t, dtype=np.int64) if interval is None else \
        (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h // merge_size), np.arange(w // merge_size), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start


def _row_positions(types: np.ndarray, grids: dict, merge_size: int) -> np.ndarray:
    """3D ids of one unpadded row: int64 [3, n]. `grids` maps type -> iterator of grid_thw."""
    blocks, current = [], 0
    for kind, start, end in _runs(types):
        if kind == TEXT:
            blocks.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + current, (3, end - start)))
            current += end - start
            continue
        name = "image" if kind == IMAGE else "video"
        grid = next(grids[kind], None)
        if grid is None:
            raise EdgevlError(f"The prompt has more {name} placeholder runs than {name} grids were given.")
        block = _vision_block(current, grid, merge_size, next(grids["intervals"]) if kind == VIDEO else None)
        if block.shape[1] != end - start:
            raise EdgevlError(
                f"A {name} placeholder run has {end - start} tokens but its grid {tuple(int(v) for v in grid)} "
                f"needs {block.shape[1]}."
            )
        blocks.append(block)
        # transformers 5.x advances by the spatial extent only, even for videos with t > h/m, w/m.
        current += max(int(grid[1]), int(grid[2])) // merge_size
    return np.concatenate(blocks, axis=1)


def mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
    video_intervals=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill 3D rope ids, like `Qwen2VLModel.get_rope_index` (and Qwen2.5-VL's with `video_intervals`).

    input_ids: int64 [B, S]; attention_mask: [B, S] (nonzero = real token) or None.
    image_grid_thw: [n_images, 3], video_grid_thw: [n_videos, 3], consumed in
    order across the whole batch. video_intervals: per video, the temporal id step per temporal patch
    (Qwen2.5-VL: tokens_per_second * second_per_grid_t, as float32); None: 1 (Qwen2-VL).
    Returns position_ids int64 [3, B, S] (padded positions are 0) and
    rope_deltas int64 [B, 1] = max id + 1 - number of real tokens.
    """
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    keep = np.ones((batch, seq), dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = mm_token_type_ids(input_ids, image_token_id, video_token_id)  # [B, S]
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ()),
        VIDEO: iter(np.asarray(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None else ()),
        "intervals": iter(video_intervals) if video_intervals is not None else iter(lambda: None, 0),
    }
    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        if not keep[b].any():
            raise EdgevlError(f"Batch row {b} has no tokens left after applying the attention mask.")
        positions = _row_positions(types[b][keep[b]], grids, spatial_merge_size)  # [3, n]
        position_ids[:, b, keep[b]] = positions
        rope_deltas[b, 0] = positions.max() + 1 - positions.shape[1]
    return position_ids, rope_deltas


def split_temporal_patches(video_grid_thw: np.ndarray | None) -> np.ndarray | None:
    """Each (t, h, w) video grid as t grids (1, h, w), in order: how Qwen3-VL's get_rope_index sees videos."""
    if video_grid_thw is None:
        return None
    grids = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    split = np.repeat(grids, grids[:, 0], axis=0)
    split[:, 0] = 1
    return split


def qwen3_vl_mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill 3D rope ids like `Qwen3VLModel.get_rope_index`: `mrope_position_ids` with every video's temporal
    patches as separate (1, h, w) grids. The prompt must carry each temporal patch as its own run of video pads
    (qwen3_vl_prompt.video_prompt puts a timestamp and vision_end/vision_start between them); there is no
    tokens_per_second scaling. Same arguments and returns as `mrope_position_ids`."""
    return mrope_position_ids(input_ids, attention_mask, image_token_id, video_token_id, image_grid_thw,
                              split_temporal_patches(video_grid_thw), spatial_merge_size)


def text_position_ids(real_lengths: np.ndarray, rope_deltas: np.ndarray, seq_len: int = 1) -> np.ndarray:
    """3D ids of `seq_len` new text tokens per row: int64 [3, B, seq_len] = real_lengths[b] + i + rope_deltas[b],
    where real_lengths[b] counts the row's tokens before them (padding excluded)."""
    text = np.asarray(real_lengths, np.int64)[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
    text = text + np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(text, (3, *text.shape)).copy()


def decode_position_ids(
    rope_deltas: np.ndarray,
    cache_length: int,
    seq_len: int = 1,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """3D ids for `seq_len` new tokens after `cache_length` cached ones: int64 [3, B, seq_len].

    Text tokens have equal ids on all three axes: 1-D position + rope_deltas.
    Without a mask the 1-D position is cache_length + arange(seq_len) (the
    transformers no-mask branch); this is wrong for left-padded rows.
    With attention_mask [B, cache_length + seq_len] it is the number of real
    tokens before the new one (cumsum - 1, 0 where masked), which is what
    `generate()` ends up using for padded batches.
    """
    rope_deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)  # [B, 1]
    batch = rope_deltas.shape[0]
    if attention_mask is None:
        text = np.broadcast_to(np.arange(cache_length, cache_length + seq_len, dtype=np.int64), (batch, seq_len))
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != (batch, cache_length + seq_len):
            raise EdgevlError(
                f"Decode attention mask has shape {mask.shape}, expected {(batch, cache_length + seq_len)}."
            )
        text = np.cumsum(mask.astype(np.int64), axis=-1) - 1  # [B, cache+seq]
        text = np.where(mask == 0, 0, text)[:, -seq_len:]  # [B, seq]
    return np.broadcast_to(text + rope_deltas, (3, batch, seq_len)).copy()  # [3, B, seq]
