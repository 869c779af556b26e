"""edgevl.runtime.inputs.rope_index against a tiny transformers Qwen2-VL model."""

import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.vision_utils import get_vision_position_ids

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.rope_index import (
    decode_position_ids,
    mrope_position_ids,
    vision_rotary_position_ids,
)
from tests.runtime.inputs.rope_cases import (
    IMG, MERGE, PAD, VE, VID, VS, as_grid, check_against_transformers, check_decode_steps, left_pad,
    positions_seen_by_generate,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def model():
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def vision(token: int, grid) -> list[int]:
    """vision_start, one placeholder per merged token, vision_end."""
    t, h, w = grid
    return [VS] + [token] * (t * h * w // MERGE**2) + [VE]








def ours(ids, mask, image_grids, video_grids):
    return mrope_position_ids(ids, mask, IMG, VID, image_grids, video_grids, MERGE)


def prompt_one_image():
    return [[5, 6, 7] + vision(IMG, (1, 4, 6)) + [8, 9]], [(1, 4, 6)], []


def prompt_two_images():
    return [[5] + vision(IMG, (1, 4, 6)) + [6, 7] + vision(IMG, (1, 8, 4)) + [8]], [(1, 4, 6), (1, 8, 4)], []


def prompt_text_only():
    return [[5, 6, 7, 8, 9, 10]], [], []


def prompt_video_t3():
    return [[5, 6] + vision(VID, (3, 4, 4)) + [7, 8, 9]], [], [(3, 4, 4)]


def prompt_long_video():
    # t (6) larger than the merged side (1): transformers 5.x text after it overlaps the time axis.
    return [[5] + vision(VID, (6, 2, 2)) + [7, 8]], [], [(6, 2, 2)]


def prompt_image_and_video():
    return [[5] + vision(IMG, (1, 6, 4)) + [6] + vision(VID, (2, 4, 8)) + [7, 8]], [(1, 6, 4)], [(2, 4, 8)]


def prompt_padded_batch():
    row0 = [5, 6] + vision(IMG, (1, 4, 6)) + [7, 8, 9, 10, 11]
    row1 = [5] + vision(IMG, (1, 4, 4)) + [6] + vision(VID, (2, 4, 4)) + [7]
    row2 = [5, 6, 7]
    return [row0, row1, row2], [(1, 4, 6), (1, 4, 4)], [(2, 4, 4)]


PROMPTS = {
    "one_image": prompt_one_image,
    "two_images": prompt_two_images,
    "text_only": prompt_text_only,
    "video_t3": prompt_video_t3,
    "long_video": prompt_long_video,
    "image_and_video": prompt_image_and_video,
    "padded_batch": prompt_padded_batch,
}


# A padded batch is meaningless without its mask; every other prompt runs both ways.
MASK_CASES = [(n, True) for n in sorted(PROMPTS)] + [(n, False) for n in sorted(PROMPTS) if n != "padded_batch"]


@pytest.mark.parametrize("name,use_mask", MASK_CASES)
def test_mrope_matches_get_rope_index(model, name, use_mask):
    check_against_transformers(model, ours, *PROMPTS[name](), use_mask)


def test_padding_gets_zero_and_video_time_advances_per_patch():
    rows, image_grids, video_grids = prompt_padded_batch()
    ids, mask = left_pad(rows)
    pos, _ = ours(ids, mask, as_grid(image_grids), as_grid(video_grids))
    assert (pos[:, mask == 0] == 0).all()
    rows, _, video_grids = prompt_video_t3()
    ids, _ = left_pad(rows)
    pos, _ = ours(ids, None, None, as_grid(video_grids))
    video = pos[:, 0, ids[0] == VID]  # [3, 12]: t=3, 2x2 merged tokens each
    assert video[0].tolist() == [3] * 4 + [4] * 4 + [5] * 4


def test_mismatched_grids_raise():
    rows, image_grids, _ = prompt_one_image()
    ids, mask = left_pad(rows)
    with pytest.raises(EdgevlError, match="grid"):
        ours(ids, mask, as_grid([(1, 4, 4)]), None)
    with pytest.raises(EdgevlError, match="image"):
        ours(ids, mask, None, None)


@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 4, 6), (3, 4, 4), (1, 16, 10), (2, 6, 8)])
def test_vision_rotary_ids_match(grid):
    ref = get_vision_position_ids(torch.tensor([grid]), MERGE).numpy()
    got = vision_rotary_position_ids(grid, MERGE)
    assert got.dtype == np.int64 and got.shape == (grid[0] * grid[1] * grid[2], 2)
    np.testing.assert_array_equal(got, ref)


def test_vision_rotary_ids_concatenate_like_a_batch():
    grids = [(1, 4, 6), (2, 8, 4)]
    ref = get_vision_position_ids(torch.tensor(grids), MERGE).numpy()
    np.testing.assert_array_equal(np.concatenate([vision_rotary_position_ids(g, MERGE) for g in grids]), ref)


class FakeCache:
    def __init__(self, length):
        self.length = length

    def get_seq_length(self):
        return self.length


@pytest.mark.parametrize("seq_len", [1, 3])
def test_decode_matches_compute_3d_position_ids(model, seq_len):
    rows, image_grids, video_grids = prompt_padded_batch()
    ids, mask = left_pad(rows)
    _, deltas = ours(ids, mask, as_grid(image_grids), as_grid(video_grids))
    model.model.rope_deltas = torch.from_numpy(deltas)
    cache = ids.shape[1]
    embeds = torch.zeros(len(rows), seq_len, HIDDEN)
    new_ids = torch.full((len(rows), seq_len), 5)
    # No mask: cache_length + arange + delta.
    ref = model.model.compute_3d_position_ids(new_ids, embeds, cache=FakeCache(cache))
    np.testing.assert_array_equal(decode_position_ids(deltas, cache, seq_len), ref.numpy())
    # With mask: transformers builds ids for the whole mask; the new tokens are the last columns.
    full_mask = np.concatenate([mask, np.ones((len(rows), seq_len), dtype=np.int64)], axis=1)
    ref = model.model.compute_3d_position_ids(new_ids, embeds, attention_mask=torch.from_numpy(full_mask),
                                              cache=FakeCache(cache))
    got = decode_position_ids(deltas, cache, seq_len, attention_mask=full_mask)
    np.testing.assert_array_equal(got, ref.numpy()[..., -seq_len:])


@pytest.mark.parametrize("name", ["padded_batch", "one_image"])
def test_matches_positions_used_by_generate(model, name):
    rows, image_grids, video_grids = PROMPTS[name]()
    ids, mask = left_pad(rows)
    image_grids, video_grids = as_grid(image_grids), as_grid(video_grids)
    seen = positions_seen_by_generate(model, ids, mask, image_grids, video_grids, patch=1176)
    pos, deltas = ours(ids, mask, image_grids, video_grids)
    np.testing.assert_array_equal(seen[0], pos)
    check_decode_steps(seen, deltas, mask)