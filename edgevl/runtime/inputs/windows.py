"""Qwen2.5-VL's window attention layout, in numpy: which patches share a window, and the orders in and out.

The vision tower attends within windows of `window_size` pixels in most blocks (112 px: 8x8 patches, 4x4
merged units) and over the whole image in the blocks of `fullatt_block_indexes`. Like transformers
(`vision_utils.get_vision_window_index`), the merged units of an image are cut into windows row-major, the
grid padded up to whole windows (odd sizes leave partial windows at the right and bottom edges), and the
patches are reordered so that each window's are contiguous; the merger's output is put back in the
original order afterwards.

The graph takes the window-ordered patches plus a fixed-width view of the windows:
    window_gather  [num_windows, slots] int64  row (in window order) each slot holds; num_patches = padding
    window_mask    [num_windows, slots] int64  1 where a slot holds a row
    window_scatter [num_patches] int64         the slot (flattened) each row went to
with slots = (window_size / patch_size)^2 patches. Windows without a row are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.artifact import names


@dataclass(frozen=True)
class WindowLayout:
    unit_order: np.ndarray      # [units] merged units (merge-block order) in window order (transformers' window_index)
    patch_order: np.ndarray     # [patches] rows of pixel_values / rotary ids in window order
    gather: np.ndarray          # [windows, slots]
    mask: np.ndarray            # [windows, slots]
    scatter: np.ndarray         # [patches]

    @property
    def restore(self) -> np.ndarray:
        """Merger output rows (window order) -> the original merge-block order."""
        return np.argsort(self.unit_order, kind="stable")

    def feed(self) -> dict[str, np.ndarray]:
        return {names.WINDOW_GATHER: self.gather, names.WINDOW_MASK: self.mask, names.WINDOW_SCATTER: self.scatter}


def window_layout(h: int, w: int, merge: int, window_size: int, patch_size: int) -> WindowLayout:
    """The layout of one (1, h, w) segment (an image, or one temporal patch of a video)."""
    side = window_size // merge // patch_size                     # merged units per window side
    unit = merge * merge                                          # patches per merged unit
    lh, lw = h // merge, w // merge
    nwh, nww = -(-lh // side), -(-lw // side)
    grid = np.full((nwh * side, nww * side), -1, np.int64)
    grid[:lh, :lw] = np.arange(lh * lw).reshape(lh, lw)
    windows = grid.reshape(nwh, side, nww, side).transpose(0, 2, 1, 3).reshape(nwh * nww, side * side)
    windows = [row[row >= 0] for row in windows]
    windows = [row for row in windows if len(row)]
    unit_order = np.concatenate(windows)
    patch_order = (unit_order[:, None] * unit + np.arange(unit)).reshape(-1)
    slots = side * side * unit
    n = len(patch_order)
    gather = np.full((len(windows), slots), n, np.int64)
    mask = np.zeros((len(windows), slots), np.int64)
    scatter = np.empty(n, np.int64)
    start = 0
    for k, row in enumerate(windows):
        count = len(row) * unit
        gather[k, :count] = np.arange(start, start + count)
        mask[k, :count] = 1
        scatter[start:start + count] = k * slots + np.arange(count)
        start += count
    return WindowLayout(unit_order, patch_order, gather, mask, scatter)
