"""The decode loop: `prefill`, `decode_one_token` and `generate`, over any decoder Runner and KV cache.

The decoder graph is one function of (inputs_embeds, position_ids, the cache's length inputs, past KV)
-> (each row's last logits, their argmax, present KV); kv_cache.py owns what the cache feeds and how it
takes a call's outputs in. Prefill feeds the whole prompt; each decode step feeds one token per row.
A finished row keeps receiving the pad token (as transformers does) until every row is done.

Greedy decoding without a repetition penalty reads the graph's own `next_token` (argmax in the graph),
so a device runner may keep the [B, vocab] logits on the device and bring back B integers per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.runtime.inputs.rope_index import text_position_ids
from edgevl.runtime.backends.runner import Runner
from edgevl.runtime.backends.tensors import to_host
from edgevl.runtime.sampling import SamplingOptions, next_tokens


@dataclass
class Prompt:
    """A padded batch of prompts (or of new turns after a cached prefix), ready for prefill."""

    embeds: np.ndarray           # [B, S, H] the tokens not yet in the cache, padded on the cache's side
    context_ids: np.ndarray      # [B, T] every token of the context (cached + new, padded): repetition penalty
    position_ids: np.ndarray     # [3, B, S] M-RoPE ids of the new tokens
    rope_deltas: np.ndarray      # [B, 1] from mrope_position_ids: decode positions = real length + delta
    new_tokens: np.ndarray       # [B] real (not padding) tokens per row in `embeds`


@dataclass(frozen=True)
class StopRule:
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int


def decoder_step(decoder: Runner, cache, embeds: np.ndarray, position_ids: np.ndarray, new: np.ndarray) -> dict:
    """One decoder call adding new[b] tokens to row b of `cache`; returns the graph's outputs (logits, next_token)."""
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: position_ids, **cache.feed(new, embeds.shape[1])}
    outputs = decoder.infer(feed, cache.bindings())
    cache.advance(outputs, new)
    return outputs


def prefill(decoder: Runner, cache, prompt: Prompt) -> dict:
    return decoder_step(decoder, cache, prompt.embeds, prompt.position_ids, prompt.new_tokens)


def decode_one_token(decoder: Runner, cache, embeddings, tokens: np.ndarray, rope_deltas: np.ndarray) -> dict:
    """tokens [B] just chosen -> the graph's outputs for the next position.

    New tokens are text: all three M-RoPE rows equal each row's real length + rope_deltas.
    embeddings: runtime.embeddings.EmbeddingTable (rows in the decoder's input dtype).
    """
    embeds = embeddings.rows(tokens)[:, None, :]                                               # [B, 1, H]
    position_ids = text_position_ids(cache.real_lengths, rope_deltas)                         # [3, B, 1]
    return decoder_step(decoder, cache, embeds, position_ids, np.ones(len(tokens), np.int64))


def choose(outputs: dict, context: np.ndarray, opts: SamplingOptions) -> np.ndarray:
    """Next token per row: the graph's own argmax when decoding is plain greedy, else sampled from the logits."""
    if not opts.do_sample and opts.repetition_penalty == 1.0 and names.NEXT_TOKEN in outputs:
        return to_host(outputs[names.NEXT_TOKEN]).astype(np.int64)
    return next_tokens(to_host(outputs[names.LOGITS]), context, opts)


class HostOutputs:
    """A decoder call's outputs, each brought to the host once, when a row first asks for it."""

    def __init__(self, outputs: dict):
        self.outputs, self.host = outputs, {}

    def __contains__(self, name: str) -> bool:
        return name in self.outputs

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.host:
            self.host[name] = to_host(self.outputs[name])
        return self.host[name]


def choose_row(outputs: HostOutputs, index: int, context: np.ndarray, opts: SamplingOptions) -> int:
    """Row `index`'s next token, as `choose` picks it for a batch of one: the graph's argmax when decoding is plain
    greedy, else sampled from its logits with its own options (context [T]: prompt + generated)."""
    if not opts.do_sample and opts.repetition_penalty == 1.0 and names.NEXT_TOKEN in outputs:
        return int(outputs[names.NEXT_TOKEN][index])
    return int(next_tokens(outputs[names.LOGITS][index:index + 1], context[None], opts)[0])


def choose_guided(outputs: dict, context: np.ndarray, opts: SamplingOptions, guides: list, active: np.ndarray,
                  pad_id: int) -> np.ndarray:
    """Next token per row through each row's Guide (runtime/guide.py; None = `choose_row`); finished rows: pad."""
    host = HostOutputs(outputs)
    return np.array([pad_id if not active[b] else guide.choose(host, b, context[b], opts) if guide is not None
                     else choose_row(host, b, context[b], opts) for b, guide in enumerate(guides)], np.int64)


@dataclass
class Generation:
    token_ids: np.ndarray                        # [B, n] generated ids (pad after a row finished)
    lengths: list[int]                           # real generated length per row (EOS included)
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step


def generate(decoder: Runner, cache, embeddings, prompt: Prompt, opts: SamplingOptions, stop: StopRule,
             on_token: Callable[[int, int], bool] | None = None, guides: list | None = None) -> Generation:
    """Greedy or sampled generation with a KV cache.

    on_token(row, token_id) is called for each real new token and returns True to stop that row
    (stop strings); EOS stops a row by itself. guides: per row a runtime.guide.Guide or None (logprobs,
    logit bias, penalties, a grammar), which then chooses that row's tokens.
    """
    bsz = len(prompt.new_tokens)
    t0 = time.perf_counter()
    outputs = prefill(decoder, cache, prompt)
    result = Generation(np.zeros((bsz, 0), np.int64), [0] * bsz, prefill_s=time.perf_counter() - t0)
    context = prompt.context_ids
    active = np.ones(bsz, bool)
    for step in range(stop.max_new_tokens):
        if guides is None:
            tokens = np.where(active, choose(outputs, context, opts), stop.pad_id).astype(np.int64)
        else:
            tokens = choose_guided(outputs, context, opts, guides, active, stop.pad_id)
        result.token_ids = np.concatenate([result.token_ids, tokens[:, None]], axis=1)
        for row in np.flatnonzero(active):
            result.lengths[row] += 1
            halt = on_token(int(row), int(tokens[row])) if on_token else False
            if tokens[row] in stop.eos_ids or halt:
                active[row] = False
        if not active.any() or step == stop.max_new_tokens - 1:
            break
        context = np.concatenate([context, tokens[:, None]], axis=1)
        t0 = time.perf_counter()
        outputs = decode_one_token(decoder, cache, embeddings, tokens, prompt.rope_deltas)
        result.decode_s.append(time.perf_counter() - t0)
    return result
