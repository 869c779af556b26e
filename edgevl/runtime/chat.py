"""Multi-turn chat that reuses the KV cache of earlier turns.

Each turn renders the WHOLE conversation with the chat template (so the prompt is
exactly what a fresh run would see), tokenizes it, and compares it with the tokens
already in the cache: only the tokens after the common prefix are prefilled. If
the template re-tokenizes an earlier part differently, the cache is cut back to
the common prefix (KV rows are per position, so a prefix of the cache is valid; an
in-place cache only forgets its length, nothing is copied).

Images (paths or PIL images) and videos (paths or `VideoClip`s from `load_video`)
attach to a user turn, images before videos as `Pipeline.prepare` puts them.
Their embeddings and grids are kept for the whole conversation: every turn
re-tokenizes it all (the pad counts come from the grids), and M-RoPE positions of
the new tokens come from the whole sequence (earlier images and videos shift
them), sliced to the new part. No image or video goes through the vision encoder
twice.

Context policy: when a turn would not fit in the model's context (prompt plus at
least one new token), `send` raises EdgevlError asking for /reset; nothing is
silently dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import PromptTooLong
from edgevl.runtime.generate import Decoding, Prompt, Result, Timings
from edgevl.runtime.inputs.plan import decode_inputs
from edgevl.runtime.pipeline import Pipeline
from edgevl.runtime.inputs.prompt import user_message
from edgevl.runtime.vision import VisionFeatures


@dataclass
class ChatSession:
    pipe: Pipeline
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    images: list[VisionFeatures] = field(default_factory=list)      # per image, in conversation order
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[VisionFeatures] = field(default_factory=list)      # per video, in conversation order
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)        # per video: seconds per temporal patch
    video_timestamps: list[tuple[float, ...]] = field(default_factory=list)  # per video: its patches' times
    cached_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens whose KV is cached
    cache: object | None = None                                    # the pipeline's KV cache (kv_cache.py)
    last_prefill_tokens: int = 0

    def reset(self) -> None:
        self.messages, self.images, self.grids = [], [], []
        self.videos, self.video_grids, self.video_seconds, self.video_timestamps = [], [], [], []
        self.cached_ids = np.zeros(0, np.int64)
        if self.cache is not None:
            self.cache.truncate(0)          # keep the buffers: an in-place cache is allocated once

    def send(self, text: str, images=(), videos=(), on_text=None, decoding: Decoding | None = None,
             **settings) -> Result:
        """Add a user turn (images, then videos, then text), generate the reply, keep both in the history.

        decoding: how the reply is made (`Pipeline.decoding`), or its settings as keywords (max_new_tokens, default
        256 here, stop, the sampling options).

        images: paths or PIL images; videos: paths (sampled at 2 fps), VideoInputs or `VideoClip`s. The whole
        conversation's cost is checked from the new images' and videos' headers before any is decoded (a video
        is fitted to what the context has left, as `Pipeline.plan_messages` does).
        """
        if not text.strip():
            raise EdgevlError("the message is empty.")
        decoding = self.pipe.resolve_decoding(decoding, {"max_new_tokens": 256, **settings} if decoding is None else settings)
        t0 = time.perf_counter()
        messages = self._with_system([*self.messages, user_message(text, len(images), len(videos))])
        try:
            plan = self.pipe.plan_messages(messages, images, videos, prior_grids=self.grids,
                                           prior_video_grids=self.video_grids)
        except PromptTooLong as e:
            raise EdgevlError(f"the conversation would need {'at least ' if videos else ''}{e.tokens} tokens and "
                              f"the model's context is {e.context}; type /reset to start a new conversation.") from None
        new_images, new_videos = decode_inputs(self.pipe, plan)
        grids = self.grids + [g for _, g in new_images]
        video_grids = self.video_grids + [v.grid for v in new_videos]
        video_seconds = self.video_seconds + [v.seconds for v in new_videos]
        video_timestamps = self.video_timestamps + [v.timestamps for v in new_videos]
        ids = self.pipe.tokenize_messages(messages, grids, video_grids, video_timestamps=video_timestamps)
        try:
            self.pipe.check_context(len(ids))   # before the (costly) vision encoder
        except PromptTooLong:
            raise EdgevlError(f"the conversation is {len(ids)} tokens and the model's context is "
                              f"{self.pipe.max_context}; type /reset to start a new conversation.") from None
        timings = Timings(preprocess_s=time.perf_counter() - t0)

        t0 = time.perf_counter()
        images = self.images + [self.pipe.encode(pv, g) for pv, g in new_images]
        videos = self.videos + [self.pipe.encode(v.pixel_values, v.grid) for v in new_videos]
        timings.vision_s = time.perf_counter() - t0
        keep = self._reuse_prefix(ids)
        embeds = self.pipe.embed(ids, [f.embeds for f in images], [f.embeds for f in videos])[keep:]    # [S_new, H]
        levels = self.pipe.deepstack(ids, [f.deepstack for f in images], [f.deepstack for f in videos])
        mask = np.ones((1, len(ids)), np.int64)
        position_ids, rope_deltas = self.pipe.positions(ids[None], mask, grids, video_grids, video_seconds)
        self.last_prefill_tokens = len(ids) - keep
        prompt = Prompt(embeds[None], ids[None], position_ids[:, :, keep:], rope_deltas,
                        np.array([len(ids) - keep]), None if levels is None else levels[:, None, keep:])
        result = self.pipe.decode(prompt, mask, self.cache, decoding, (lambda _, d: on_text(d)) if on_text else None,
                                  timings=timings)[0]
        # The cache now holds the prompt and every generated token but the last (never fed back).
        self.cached_ids = np.concatenate([ids, np.asarray(result.token_ids[:-1], np.int64)])
        self.messages = messages[1:] if self.system is not None else messages
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        # Only now, after a successful turn: a failed turn (a bad video, a full context) changes no history.
        self.images, self.grids = images, grids
        self.videos, self.video_grids, self.video_seconds = videos, video_grids, video_seconds
        self.video_timestamps = video_timestamps
        return result

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system is None:
            return messages
        return [{"role": "system", "content": [{"type": "text", "text": self.system}]}, *messages]

    def _reuse_prefix(self, ids: np.ndarray) -> int:
        """Cut the cache back to the longest common prefix with `ids`; returns how many tokens it keeps.

        At least one token is always left to prefill (the decoder needs a query to produce logits).
        """
        if self.cache is None:
            self.cache = self.pipe.new_cache(1)
        n = min(len(self.cached_ids), len(ids) - 1)
        same = np.flatnonzero(self.cached_ids[:n] != ids[:n])
        keep = int(same[0]) if len(same) else n
        self.cache.truncate(keep)
        self.cached_ids = self.cached_ids[:keep]
        return keep
