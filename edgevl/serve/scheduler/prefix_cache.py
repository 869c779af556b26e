"""Prefix caching for the server's batch rows: a row that finished a request keeps its KV cache, and a later
request whose prompt starts the same way (a multi-turn chat resending its history, a shared system prompt)
takes that row and prefills only what differs. Pure bookkeeping; the scheduler (batching.py) owns the cache.

What "the same" means: token ids are not enough, because every image of one size expands to the same run of
pad tokens. A prompt's *key* is its token ids with each vision pad replaced by a negative number derived from
the image's (or video's) preprocessed patches and the pad's index inside it, so two different photos never
share a prefix past their first pad. A row's key covers exactly the positions its cache holds.

    key = prompt_key(prompt, pads)                                     # the preparing thread: hashes patches
    row, keep = rows.best(free_rows, key)                              # the scheduler, admitting
    rows.remember(row, key_of_what_the_row_now_holds)                  # the scheduler, releasing
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

_DIGEST_BITS = 38            # per image; a pad adds its index (< 2**24) below: keys stay negative int64


def vision_digest(pixels: np.ndarray, grid: tuple[int, int, int]) -> int:
    """A 38-bit number for one image's or video's preprocessed patches and grid."""
    h = hashlib.blake2b(np.ascontiguousarray(pixels).view(np.uint8).reshape(-1), digest_size=8)
    h.update(np.asarray(grid, np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") >> (64 - _DIGEST_BITS)


@dataclass(frozen=True)
class PadTokens:
    """How a model's prompts hold vision: the pad token of each kind and its spatial merge size (one pad per
    merge x merge patches)."""

    image_token_id: int
    video_token_id: int
    image_merge: int
    video_merge: int


def _pads(prompt, pads: PadTokens):
    """(kind, index, pixels, grid, pad positions) for each image, then each video, in prompt order per kind."""
    ids = np.asarray(prompt.input_ids)
    for kind, token, pixels, grids, merge in (
            ("image", pads.image_token_id, prompt.pixel_values, prompt.grids, pads.image_merge),
            ("video", pads.video_token_id, prompt.video_pixel_values, prompt.video_grids, pads.video_merge)):
        where, start = np.flatnonzero(ids == token), 0
        for i, (pv, grid) in enumerate(zip(pixels, grids)):
            n = int(np.prod(grid)) // (merge * merge)
            yield kind, i, pv, tuple(grid), where[start:start + n]
            start += n


def prompt_key(prompt, pads: PadTokens) -> np.ndarray:
    """The prompt's token ids [S] with its vision pads made unique per image/video content (module docstring)."""
    key = np.asarray(prompt.input_ids, np.int64).copy()
    for _, _, pv, grid, where in _pads(prompt, pads):
        key[where] = -(1 + (vision_digest(pv, grid) << 24) + np.arange(len(where), dtype=np.int64))
    return key


def cached_vision(prompt, keep: int, pads: PadTokens) -> dict[tuple[str, int], int]:
    """{(kind, index): pad count} of the images and videos whose every pad lies in the first `keep` positions:
    their embeddings are already in the cache, so the vision encoder need not run for them."""
    return {(kind, i): len(where) for kind, i, _, _, where in _pads(prompt, pads)
            if len(where) and int(where[-1]) < keep}


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class RowPrefixes:
    """Per batch row, the key of what its KV cache holds (empty: nothing reusable)."""

    def __init__(self, rows: int):
        self.keys = [np.zeros(0, np.int64) for _ in range(rows)]

    def best(self, free: list[int], key: np.ndarray) -> tuple[int, int]:
        """The free row for a prompt with `key`, and how many of its positions to keep (at most len(key) - 1:
        the prompt's last token is prefilled again for its logits).

        A row is worth reusing when it keeps at least as many positions as it throws away (a chat's next turn
        keeps everything; an edited last message most of it); the longest such prefix wins, the lowest row on a
        tie (decode steps span rows 0..the highest busy one). Otherwise an empty row, so that a new
        conversation sharing only a system prompt does not evict another one's cache; only when every free row
        holds a cache, the one sharing the longest prefix."""
        limit = len(key) - 1
        scored = [(min(common_prefix(self.keys[row], key), limit), row) for row in free]
        worth = [(keep, row) for keep, row in scored if keep > 0 and keep >= len(self.keys[row]) - keep]
        if worth:
            keep, row = max(worth, key=lambda kr: (kr[0], -kr[1]))
            return row, keep
        empty = [row for row in free if len(self.keys[row]) == 0]
        if empty:
            return empty[0], 0
        keep, row = max(scored, key=lambda kr: (kr[0], -kr[1]))
        return row, keep

    def remember(self, row: int, key: np.ndarray) -> None:
        self.keys[row] = np.asarray(key, np.int64)

    def forget(self, row: int) -> None:
        self.keys[row] = np.zeros(0, np.int64)
