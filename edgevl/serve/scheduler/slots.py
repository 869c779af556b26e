"""What the batch scheduler keeps per row (batching.py): the job holding it (`Slot`) and the vision calls its prompt
still needs (`vision_calls`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgevl.runtime.generate import Sequence, Timings
from edgevl.serve.scheduler.jobs import Job


def vision_calls(prompt) -> list[tuple[str, int, np.ndarray, tuple[int, int, int]]]:
    """The vision encoder calls a prompt needs, one per image and per temporal patch of a video, as
    Pipeline.encode makes them: (kind, index of the image or video, its patches, grid (1, h, w))."""
    calls = []
    for kind, pixels, grids in (("image", prompt.pixel_values, prompt.grids),
                                ("video", prompt.video_pixel_values, prompt.video_grids)):
        for i, (pv, (t, h, w)) in enumerate(zip(pixels, grids)):
            calls += [(kind, i, frame, (1, h, w)) for frame in np.split(pv, t)]
    return calls


@dataclass(eq=False)
class Slot:
    """A job holding row `row` of the batch: its prompt, vision work still to do, prefill progress, and its reply
    (`reply`: the generation core's Sequence, which chooses, streams and finishes its tokens)."""

    job: Job
    row: int
    prompt: object                                  # PreparedPrompt
    reply: Sequence
    vision: list = field(default_factory=list)      # vision_calls still to run
    vision_out: dict = field(default_factory=dict)  # kind -> per image/video, its calls' VisionFeatures
    key: np.ndarray | None = None                   # prefix_cache.prompt_key of the prompt (with prefix_cache)
    embeds: np.ndarray | None = None                # [S, H] once vision is done
    deepstack: np.ndarray | None = None             # Qwen3-VL: [levels, S, H] once vision is done
    position_ids: np.ndarray | None = None          # [3, 1, S]
    rope_deltas: np.ndarray | None = None           # [1, 1]
    prefilled: int = 0                              # prompt tokens in the cache
    next_token: int | None = None                   # chosen, fed at the next decode step: the row is decoding
    started: bool = False                           # on_start told (the first token exists)
    joined: float = 0.0
    last_token_at: float = 0.0
    timings: Timings = field(default_factory=Timings)

    @property
    def length(self) -> int:
        return len(self.prompt.input_ids)

    @property
    def tokens(self) -> list[int]:
        return self.reply.tokens
