"""The vision encoder's calls and where their features go in a prompt.

`VisionEncoder` feeds the vision graph one attention segment per call (an image, or one temporal patch of a video)
with the inputs its family needs, all computed here in numpy:

    every family      pixel_values, rotary_pos_ids (rope_index.vision_rotary_position_ids)
    Qwen2.5-VL        the patches in window order, window_gather / window_mask / window_scatter (windows.py)
    Qwen3-VL          pos_embed_ids / pos_embed_weights: the learned position table's rows and bilinear weights
                      (pos_embed.py)

and returns `VisionFeatures`: the merged embeddings and, for Qwen3-VL, the DeepStack levels. Which inputs a call
gets follows from the vision graph's own inputs (the artifact contract), not from the model's name.
`scatter_vision` puts features into a prompt's rows at its image and video pads, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.artifact import names
from edgevl.artifact.model_config import ModelConfig
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.runner import Runner
from edgevl.runtime.inputs.pos_embed import pos_embed_taps
from edgevl.runtime.inputs.rope_index import vision_rotary_position_ids
from edgevl.runtime.inputs.windows import window_layout


@dataclass
class VisionFeatures:
    """One image's (or video's) features: embeds [tokens, hidden]; Qwen3-VL's deepstack [levels, tokens, hidden]."""

    embeds: np.ndarray
    deepstack: np.ndarray | None = None

    @staticmethod
    def concat(parts: list["VisionFeatures"]) -> "VisionFeatures":
        """The features of consecutive calls (a video's temporal patches) as one."""
        levels = [p.deepstack for p in parts]
        return VisionFeatures(np.concatenate([p.embeds for p in parts]),
                              None if levels[0] is None else np.concatenate(levels, axis=1))


class VisionEncoder:
    """Calls the vision runner with what its graph takes (module docstring)."""

    def __init__(self, runner: Runner, config: ModelConfig, merge_size: int):
        self.runner, self.config, self.merge = runner, config, merge_size   # `runner` may be swapped (calibration)
        if names.POS_EMBED_IDS in runner.input_metadata() and not config.num_position_embeddings:
            raise EdgevlError("the vision graph takes position-table rows but the manifest gives no "
                              "num_position_embeddings; re-export the model.")

    def __call__(self, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> VisionFeatures:
        """[t*h*w, D] patches -> their features; each temporal patch is its own call."""
        t, h, w = grid
        return VisionFeatures.concat([self.call(frame, (1, h, w)) for frame in np.split(pixel_values, t)])

    def call(self, frame: np.ndarray, grid: tuple[int, int, int]) -> VisionFeatures:
        """One vision call: the patches of one image or temporal patch, grid (1, h, w)."""
        feed, layout = self.feed(frame, grid)
        out = self.runner.infer(feed)
        embeds, deepstack = out[names.IMAGE_EMBEDS], out.get(names.DEEPSTACK_EMBEDS)
        if layout is not None:
            embeds = embeds[layout.restore]
        return VisionFeatures(embeds, deepstack)

    def feed(self, frame: np.ndarray, grid: tuple[int, int, int]):
        """(the graph's inputs for one call, the window layout or None): what `call` runs, for tools that time it."""
        _, h, w = grid
        cfg = self.config
        inputs = self.runner.input_metadata()
        rotary = vision_rotary_position_ids((1, h, w), self.merge)
        feed = {names.PIXEL_VALUES: frame.astype(inputs[names.PIXEL_VALUES].dtype, copy=False),
                names.ROTARY_POS_IDS: rotary}
        if names.POS_EMBED_IDS in inputs:
            ids, weights = pos_embed_taps((1, h, w), cfg.num_position_embeddings, self.merge)
            feed[names.POS_EMBED_IDS], feed[names.POS_EMBED_WEIGHTS] = ids, weights
        layout = window_layout(h, w, self.merge, cfg.vision_window_size, cfg.patch_size) \
            if cfg.vision_window_size else None
        if layout is not None:       # Qwen2.5-VL: patches in window order, embeddings back in image order
            feed[names.PIXEL_VALUES] = feed[names.PIXEL_VALUES][layout.patch_order]
            feed[names.ROTARY_POS_IDS] = rotary[layout.patch_order]
            feed.update(layout.feed())
        return feed, layout


def scatter_vision(input_ids: np.ndarray, rows: np.ndarray, vision: dict[str, tuple[int, list]],
                   axis: int = 0) -> np.ndarray:
    """`rows` (one per token of input_ids along `axis`) with each kind's pad rows replaced by its features, in
    order. vision: kind -> (pad token id, per image or video an array of its rows along `axis`)."""
    for kind, (token, parts) in vision.items():
        slots = np.flatnonzero(input_ids == token)
        parts = [p for p in parts if p is not None]
        count = sum(p.shape[axis] for p in parts)
        if count != len(slots):
            raise EdgevlError(f"{len(slots)} {kind} tokens in the prompt but {count} embeddings for them.")
        if count:
            index = [slice(None)] * rows.ndim
            index[axis] = slots
            rows[tuple(index)] = np.concatenate(parts, axis=axis).astype(rows.dtype, copy=False)
    return rows
