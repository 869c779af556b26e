"""Multi-turn chat that reuses the KV cache of earlier turns.

Each turn renders the WHOLE conversation with the chat template (so the prompt is
exactly what a fresh run would see), tokenizes it, and compares it with the tokens
already in the cache: only the tokens after the common prefix are prefilled. If
the template re-tokenizes an earlier part differently, the cache is cut back to
the common prefix (KV rows are per position, so a prefix of the cache is valid).

M-RoPE positions of the new tokens come from the whole sequence (earlier images
shift them), sliced to the new part; images already in the cache are not
re-encoded.

Context policy: when a turn would not fit in the model's context (prompt plus at
least one new token), `send` raises EdgevlError asking for /reset; nothing is
silently dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.runtime.generate import KVCache
from edgevl.runtime.image_processing import load_image, preprocess_image
from edgevl.runtime.pipeline import Pipeline, Result
from edgevl.runtime.prompt import user_message


@dataclass
class ChatSession:
    pipe: Pipeline
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    image_embeds: list[np.ndarray] = field(default_factory=list)   # per image, in conversation order
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    cached_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens whose KV is cached
    cache: KVCache | None = None
    last_prefill_tokens: int = 0

    def reset(self) -> None:
        self.messages, self.image_embeds, self.grids = [], [], []
        self.cached_ids, self.cache = np.zeros(0, np.int64), None

    def send(self, text: str, images=(), max_new_tokens: int = 256, stop=(), on_text=None, **sampling) -> Result:
        """Add a user turn (with optional images), generate the reply, and keep both in the history."""
        if not text.strip():
            raise EdgevlError("the message is empty.")
        t0 = time.perf_counter()
        new_images = [preprocess_image(load_image(img), self.pipe.image_settings) for img in images]
        messages = self._with_system([*self.messages, user_message(text, num_images=len(new_images))])
        grids = self.grids + [g for _, g in new_images]
        ids = self.pipe.tokenize_messages(messages, grids)
        if len(ids) + 1 > self.pipe.max_context:
            raise EdgevlError(f"the conversation is {len(ids)} tokens and the model's context is "
                              f"{self.pipe.max_context}; type /reset to start a new conversation.")
        preprocess_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        embeds_new_images = [self.pipe.encode_image(pv, g) for pv, g in new_images]
        vision_s = time.perf_counter() - t0
        keep = self._reuse_prefix(ids)
        embeds = self.pipe.embed(ids, self.image_embeds + embeds_new_images)[keep:]    # [S_new, H]
        mask = np.ones((1, len(ids)), np.int64)
        position_ids, rope_deltas = self.pipe.positions(ids[None], mask, grids)
        self.last_prefill_tokens = len(ids) - keep
        result = self.pipe.decode(ids[None], mask, embeds[None], position_ids[:, :, keep:], rope_deltas,
                                  self.cache, max_new_tokens, stop, (lambda _, d: on_text(d)) if on_text else None,
                                  {"preprocess_s": preprocess_s, "vision_s": vision_s}, **sampling)[0]
        # The cache now holds the prompt and every generated token but the last (never fed back).
        self.cached_ids = np.concatenate([ids, np.asarray(result.token_ids[:-1], np.int64)])
        self.messages = messages[1:] if self.system is not None else messages
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        self.image_embeds += embeds_new_images
        self.grids = grids
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
        if keep < self.cache.length:
            self.cache.arrays = {k: v[:, :, :keep] for k, v in self.cache.arrays.items()}
        self.cached_ids = self.cached_ids[:keep]
        return keep
