"""edgevl.runtime.inputs.rope_index.qwen3_vl_mrope_position_ids against a tiny transformers Qwen3-VL model.

Qwen3-VL prompts carry each video temporal patch as its own run, `<t seconds><|vision_start|>pads<|vision_end|>`
(qwen3_vl_prompt.video_prompt); the timestamp is ordinary text (here two arbitrary text tokens).
"""

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.rope_index import (
    mrope_position_ids,
    qwen3_vl_mrope_position_ids,
    split_temporal_patches,
)
from tests.runtime.inputs.rope_cases import (
    IMG, MERGE, PAD, VE, VID, VS, as_grid, check_against_transformers, check_decode_steps, left_pad,
    positions_seen_by_generate,
)

TIMESTAMP = [11, 12]                           # stands in for the tokens of "<0.3 seconds>"


@pytest.fixture(scope="module")
def model():
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True},
            bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def image(grid) -> list[int]:
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // MERGE**2) + [VE]


def video(grid) -> list[int]:
    """Per temporal patch: its timestamp text, vision_start, h*w/merge^2 pads, vision_end."""
    t, h, w = grid
    return [tok for _ in range(t) for tok in TIMESTAMP + [VS] + [VID] * (h * w // MERGE**2) + [VE]]








def ours(ids, mask, image_grids, video_grids):
    return qwen3_vl_mrope_position_ids(ids, mask, IMG, VID, image_grids, video_grids, MERGE)


PROMPTS = {
    "text_only": lambda: ([[5, 6, 7, 8, 9, 10]], [], []),
    "one_image": lambda: ([[5, 6, 7] + image((1, 4, 6)) + [8, 9]], [(1, 4, 6)], []),
    "two_images": lambda: ([[5] + image((1, 4, 6)) + [6, 7] + image((1, 8, 4)) + [8]], [(1, 4, 6), (1, 8, 4)], []),
    "video_t3": lambda: ([[5, 6] + video((3, 4, 6)) + [7, 8, 9]], [], [(3, 4, 6)]),
    # more temporal patches than merged rows/cols: Qwen2-VL's time ids would outrun the spatial ones here
    "long_video": lambda: ([[5] + video((6, 2, 2)) + [7, 8]], [], [(6, 2, 2)]),
    "image_and_video": lambda: ([[5] + image((1, 6, 4)) + [6] + video((2, 4, 8)) + [7, 8]], [(1, 6, 4)], [(2, 4, 8)]),
    "two_videos": lambda: ([[5] + video((2, 4, 4)) + [6] + video((3, 2, 6)) + [7]], [], [(2, 4, 4), (3, 2, 6)]),
    "padded_batch": lambda: (
        [[5, 6] + image((1, 4, 6)) + [7, 8, 9, 10, 11],
         [5] + image((1, 4, 4)) + [6] + video((2, 4, 4)) + [7],
         [5, 6, 7]],
        [(1, 4, 6), (1, 4, 4)], [(2, 4, 4)]),
}
MASK_CASES = [(n, True) for n in sorted(PROMPTS)] + [(n, False) for n in sorted(PROMPTS) if n != "padded_batch"]


@pytest.mark.parametrize("name,use_mask", MASK_CASES)
def test_positions_match_get_rope_index(model, name, use_mask):
    check_against_transformers(model, ours, *PROMPTS[name](), use_mask)


def test_each_temporal_patch_starts_after_its_timestamp():
    rows, _, video_grids = PROMPTS["video_t3"]()
    ids, _ = left_pad(rows)
    pos, _ = ours(ids, None, None, as_grid(video_grids))
    temporal = pos[0, 0]
    runs = np.split(np.flatnonzero(ids[0] == VID), np.flatnonzero(np.diff(np.flatnonzero(ids[0] == VID)) > 1) + 1)
    assert len(runs) == 3
    for run in runs:                       # t = 1 per patch: one temporal id, the text position before it + 1
        assert len(set(temporal[run].tolist())) == 1 and temporal[run[0]] == pos[0, 0, run[0] - 1] + 1
    # equal to Qwen2-VL's positions for the same prompt with the video given as three one-patch videos
    np.testing.assert_array_equal(mrope_position_ids(ids, None, IMG, VID, None, as_grid([(1, 4, 6)] * 3), MERGE)[0],
                                  pos)
    assert split_temporal_patches(as_grid(video_grids)).tolist() == [[1, 4, 6]] * 3


def test_a_video_without_per_patch_runs_is_refused():
    # Qwen2-VL's layout (one run of t*h*w/4 pads) cannot be read as Qwen3-VL's per-patch runs
    ids = np.array([[5, VS] + [VID] * (3 * 4 * 6 // 4) + [VE, 6]], dtype=np.int64)
    with pytest.raises(EdgevlError, match="video placeholder run"):
        ours(ids, None, None, as_grid([(3, 4, 6)]))


def test_generate_uses_these_positions(model):
    rows, image_grids, video_grids = PROMPTS["padded_batch"]()
    ids, mask = left_pad(rows)
    image_grids, video_grids = as_grid(image_grids), as_grid(video_grids)
    seen = positions_seen_by_generate(model, ids, mask, image_grids, video_grids, patch=3 * 2 * 16 * 16)
    pos, deltas = ours(ids, mask, image_grids, video_grids)
    np.testing.assert_array_equal(seen[0], pos)
    check_decode_steps(seen, deltas, mask)