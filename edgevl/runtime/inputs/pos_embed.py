"""Qwen3-VL's learned position table, resampled to a patch grid: 4 rows and 4 bilinear weights per patch.

Qwen3-VL's vision tower adds a learned position embedding, `pos_embed` [side * side, C] (48 x 48 on the hub),
to every patch, resampled to the image's patch grid like `F.interpolate(mode="bilinear", align_corners=True)`.
The vision graph takes the resampling as two small inputs and gathers and sums the table rows itself:

    pos_embed_ids      [N, 4] int64    rows of the table, (floor h, floor w), (floor h, ceil w), (ceil h, floor w),
                                       (ceil h, ceil w)
    pos_embed_weights  [N, 4] float32  their weights

with the patches in the order the vision graph takes them: 2 x 2 merge blocks, row-major blocks, row-major
inside a block, the whole frame repeated for every temporal patch. The arithmetic is transformers'
`get_vision_interpolation_indices_and_weights` (mode "bilinear", align_corners=True, the merge size of the
config) step by step in float32, so the ids are equal and the weights bit-identical
(tests/runtime/inputs/test_pos_embed.py).
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import EdgevlError

TAPS = 4        # bilinear: 2 per axis


def grid_side(num_position_embeddings: int) -> int:
    """The side of the square learned table: int(num_position_embeddings ** 0.5), as transformers takes it."""
    side = int(num_position_embeddings ** 0.5)
    if side < 1 or side * side != num_position_embeddings:
        raise EdgevlError(f"num_position_embeddings {num_position_embeddings} is not a square table size.")
    return side


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(taps [n, 2] int64, weights [n, 2] float32) of `index` positions on an axis of `size` patches, into a table
    of `side` positions (align_corners=True: the ends map to 0 and side - 1)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def pos_embed_taps(grid: tuple[int, int, int], num_position_embeddings: int,
                   merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """pos_embed_ids [t*h*w, 4] int64 and pos_embed_weights [t*h*w, 4] float32 for a (t, h, w) patch grid."""
    t, h, w = (int(v) for v in grid)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise EdgevlError(f"patch grid {grid} is not whole {merge_size}x{merge_size} merge blocks.")
    side = grid_side(num_position_embeddings)
    within = np.arange(h * w)
    blocks_w = w // merge_size
    row = within // (merge_size * merge_size * blocks_w) * merge_size + (within // merge_size) % merge_size
    col = (within // (merge_size * merge_size)) % blocks_w * merge_size + within % merge_size
    h_taps, h_weights = _axis_taps(row, h, side)
    w_taps, w_weights = _axis_taps(col, w, side)
    ids = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, TAPS)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, TAPS)
    return np.tile(ids, (t, 1)), np.tile(weights, (t, 1))

