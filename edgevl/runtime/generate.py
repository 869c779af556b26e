"""The decode loop: `prefill`, `decode_one_token` and `generate`, over any decoder Runner.

The decoder graph is one function of (inputs_embeds, position_ids, attention_mask,
past KV) -> (last-position logits, present KV). Prefill feeds the whole prompt
with an empty cache; each decode step feeds one token per row. Rows of a batch are
left-padded; a finished row keeps receiving the pad token (as transformers does)
until every row is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.runtime.rope_index import decode_position_ids
from edgevl.runtime.runners import Runner
from edgevl.runtime.sampling import SamplingOptions, next_tokens


@dataclass
class KVCache:
    """past_key_values.{i}.key/value, each [B, kv_heads, T, head_dim]; replaced by present.* after a step."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, kv_heads, 0, head_dim)
        return cls({past: np.zeros(shape, dtype) for past, _ in names.kv_names(num_layers)})

    @property
    def length(self) -> int:
        return next(iter(self.arrays.values())).shape[2]

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        for name in self.arrays:
            self.arrays[name] = outputs[names.present_for(name)]


def decoder_step(decoder: Runner, embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 cache: KVCache) -> np.ndarray:
    """embeds [B,S,H], position_ids [3,B,S], attention_mask [B, cache+S] -> logits [B, vocab]; updates cache."""
    outputs = decoder.infer({names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: position_ids,
                             names.ATTENTION_MASK: attention_mask, **cache.arrays})
    cache.update(outputs)
    return outputs[names.LOGITS]


def prefill(decoder, embeds, position_ids, attention_mask, cache) -> np.ndarray:
    return decoder_step(decoder, embeds, position_ids, attention_mask, cache)


def decode_one_token(decoder, embed_table: np.ndarray, tokens: np.ndarray, rope_deltas: np.ndarray,
                     attention_mask: np.ndarray, cache: KVCache, embed_dtype=None) -> np.ndarray:
    """tokens [B] just chosen; attention_mask [B, cache+1] -> next logits [B, vocab].

    New tokens are text: all three M-RoPE rows equal the 1-D position + rope_deltas.
    embed_dtype: the decoder's input dtype (the table may be stored in another precision).
    """
    embeds = np.asarray(embed_table[tokens], dtype=embed_dtype)[:, None, :]       # [B, 1, H]
    position_ids = decode_position_ids(rope_deltas, cache.length, 1, attention_mask)   # [3, B, 1]
    return decoder_step(decoder, embeds, position_ids, attention_mask, cache)


@dataclass
class Generation:
    token_ids: np.ndarray                        # [B, n] generated ids (pad after a row finished)
    lengths: list[int]                           # real generated length per row (EOS included)
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step


def generate(decoder: Runner, embed_table: np.ndarray, prompt_embeds: np.ndarray, prompt_ids: np.ndarray,
             attention_mask: np.ndarray, position_ids: np.ndarray, rope_deltas: np.ndarray, cache: KVCache,
             opts: SamplingOptions,
             max_new_tokens: int, eos_ids: list[int], pad_id: int,
             on_token: Callable[[int, int], bool] | None = None) -> Generation:
    """Greedy or sampled generation with a KV cache.

    prompt_embeds [B,S,H]; prompt_ids, attention_mask [B,S]; position_ids [3,B,S] and rope_deltas [B,1]
    (from mrope_position_ids).
    on_token(row, token_id) is called for each real new token and returns True to stop that row
    (stop strings); EOS stops a row by itself.
    """
    bsz = prompt_ids.shape[0]
    t0 = time.perf_counter()
    logits = prefill(decoder, prompt_embeds, position_ids, attention_mask, cache)
    result = Generation(np.zeros((bsz, 0), np.int64), [0] * bsz, prefill_s=time.perf_counter() - t0)
    context = prompt_ids
    active = np.ones(bsz, bool)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, context, opts)
        tokens = np.where(active, tokens, pad_id).astype(np.int64)
        result.token_ids = np.concatenate([result.token_ids, tokens[:, None]], axis=1)
        for row in np.flatnonzero(active):
            result.lengths[row] += 1
            stop = on_token(int(row), int(tokens[row])) if on_token else False
            if tokens[row] in eos_ids or stop:
                active[row] = False
        if not active.any() or step == max_new_tokens - 1:
            break
        context = np.concatenate([context, tokens[:, None]], axis=1)
        attention_mask = np.concatenate([attention_mask, np.ones((bsz, 1), attention_mask.dtype)], axis=1)
        t0 = time.perf_counter()
        logits = decode_one_token(decoder, embed_table, tokens, rope_deltas, attention_mask, cache,
                                  prompt_embeds.dtype)
        result.decode_s.append(time.perf_counter() - t0)
    return result
