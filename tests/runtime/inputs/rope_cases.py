"""What the two get_rope_index suites (test_rope_index.py for Qwen2-VL, test_rope_index_qwen3.py) share: the token ids
inside the tiny vocabularies, left padding, grids as arrays, transformers' get_rope_index on numpy inputs, and the
equality check of positions and deltas."""

from __future__ import annotations

import numpy as np
import torch

IMG, VID, VS, VE, PAD = 100, 101, 102, 103, 0  # token ids inside the tiny vocab
MERGE = 2


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.array([[PAD] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return ids, mask


def as_grid(grids):
    return None if not grids else np.array(grids, dtype=np.int64)


def hf_rope_index(model, ids, mask, image_grids, video_grids):
    ids_t = torch.from_numpy(ids)
    types = (ids_t == IMG).int() + 2 * (ids_t == VID).int()  # what the processor returns
    as_tensor = lambda g: None if g is None else torch.from_numpy(g.copy())  # noqa: E731
    pos, deltas = model.model.get_rope_index(
        ids_t, mm_token_type_ids=types, image_grid_thw=as_tensor(image_grids),
        video_grid_thw=as_tensor(video_grids), attention_mask=None if mask is None else torch.from_numpy(mask),
    )
    return pos.numpy(), deltas.numpy()


def check_against_transformers(model, ours, rows, image_grids, video_grids, use_mask: bool) -> None:
    """`ours(ids, mask, image_grids, video_grids)` gives get_rope_index's positions and deltas, dtypes and shapes."""
    ids, mask = left_pad(rows)
    mask = mask if use_mask else None
    image_grids, video_grids = as_grid(image_grids), as_grid(video_grids)
    pos, deltas = ours(ids, mask, image_grids, video_grids)
    ref_pos, ref_deltas = hf_rope_index(model, ids, mask, image_grids, video_grids)
    assert pos.dtype == np.int64 and deltas.dtype == np.int64
    assert pos.shape == (3, *ids.shape) and deltas.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


def positions_seen_by_generate(model, ids, mask, image_grids, video_grids, patch: int) -> list[np.ndarray]:
    """The 3-D position ids transformers' generate gives the language model at each of 3 steps (prefill first),
    with random pixels of `patch` values per patch; [3, B, S] each (generate's leading 1-D text row dropped)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    ids_t = torch.from_numpy(ids)
    inputs = dict(input_ids=ids_t, attention_mask=torch.from_numpy(mask),
                  mm_token_type_ids=(ids_t == IMG).int() + 2 * (ids_t == VID).int(), max_new_tokens=3,
                  do_sample=False)
    torch.manual_seed(1)
    if image_grids is not None:
        inputs.update(image_grid_thw=torch.from_numpy(image_grids),
                      pixel_values=torch.randn(int(np.prod(image_grids, axis=1).sum()), patch))
    if video_grids is not None:
        inputs.update(video_grid_thw=torch.from_numpy(video_grids),
                      pixel_values_videos=torch.randn(int(np.prod(video_grids, axis=1).sum()), patch))
    try:
        with torch.no_grad():
            model.generate(**inputs)
    finally:
        hook.remove()
    return [(s[1:] if s.shape[0] == 4 else s).numpy() for s in seen]


def check_decode_steps(seen: list[np.ndarray], deltas: np.ndarray, mask: np.ndarray) -> None:
    """Every decode step's positions in `seen` (after the prefill) equal decode_position_ids with the grown mask
    and what the generation loop computes: each row's real length so far + its delta."""
    from edgevl.runtime.inputs.rope_index import decode_position_ids, text_position_ids
    batch, prompt_len = mask.shape
    assert len(seen) == 3
    for step, used in enumerate(seen[1:]):
        full_mask = np.ones((batch, prompt_len + step + 1), dtype=np.int64)
        full_mask[:, :prompt_len] = mask
        np.testing.assert_array_equal(decode_position_ids(deltas, prompt_len + step, 1, attention_mask=full_mask),
                                      used)
        np.testing.assert_array_equal(text_position_ids(full_mask[:, :-1].sum(1), deltas), used)
        if mask.all():  # without padding the no-mask formula agrees too
            np.testing.assert_array_equal(decode_position_ids(deltas, prompt_len + step), used)
