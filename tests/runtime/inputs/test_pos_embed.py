"""runtime/inputs/pos_embed.py: Qwen3-VL's learned position table resampled per patch, against transformers.

transformers 5 computes the 4 rows and weights per patch in `vision_utils.get_vision_interpolation_indices_and_weights`
(what `Qwen3VLVisionModel.fast_pos_embed_interpolate` became); the numpy copy must give the same rows and the same
float32 weights bit for bit, in the 2x2 merge-block order, repeated per temporal patch.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.pos_embed import grid_side, pos_embed_taps

GRIDS = [(1, 8, 8), (1, 10, 14), (1, 2, 2), (1, 64, 2), (1, 2, 96), (1, 50, 30), (1, 96, 96), (3, 6, 18), (2, 4, 4)]


def _transformers(grid, num_position_embeddings, merge=2):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights
    ids, weights = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), int(num_position_embeddings ** 0.5), mode="bilinear", align_corners=True,
        spatial_merge_size=merge)
    return ids.numpy(), weights.numpy()


@pytest.mark.parametrize("table", [2304, 64])
@pytest.mark.parametrize("grid", GRIDS)
def test_rows_and_weights_equal_transformers(grid, table):
    ids, weights = pos_embed_taps(grid, table, 2)
    ref_ids, ref_weights = _transformers(grid, table)
    assert ids.dtype == np.int64 and weights.dtype == np.float32 and ids.shape == (np.prod(grid), 4)
    np.testing.assert_array_equal(ids, ref_ids)
    assert np.array_equal(weights.view(np.uint32), ref_weights.view(np.uint32))         # bit-identical


def test_the_vision_tower_adds_what_the_rows_and_weights_give():
    """An independent reference: F.interpolate(bilinear, align_corners=True) of the table to the grid, the patches
    put in 2x2 merge-block order and repeated per temporal patch, equals the weighted sum of the rows."""
    side, channels, (t, h, w) = 48, 5, (2, 10, 14)
    table = torch.randn(side * side, channels, generator=torch.Generator().manual_seed(0))
    ids, weights = pos_embed_taps((t, h, w), side * side, 2)
    ours = (table[torch.from_numpy(ids)] * torch.from_numpy(weights)[..., None]).sum(1)
    grid = torch.nn.functional.interpolate(table.t().reshape(1, channels, side, side), size=(h, w), mode="bilinear",
                                           align_corners=True)[0]                            # [C, h, w]
    blocks = grid.reshape(channels, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, channels)
    torch.testing.assert_close(ours, blocks.repeat(t, 1), atol=1e-4, rtol=0)    # interpolate lerps in another order


def test_bad_grids_and_tables_are_refused():
    with pytest.raises(EdgevlError, match="merge blocks"):
        pos_embed_taps((1, 5, 4), 2304, 2)
    with pytest.raises(EdgevlError, match="merge blocks"):
        pos_embed_taps((0, 4, 4), 2304, 2)
    with pytest.raises(EdgevlError, match="square"):
        grid_side(2300)
    assert grid_side(2304) == 48


def test_pos_embed_does_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import edgevl.runtime.inputs.pos_embed\n")
    subprocess.run([sys.executable, "-c", code], check=True)
