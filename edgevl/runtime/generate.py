"""The generation core: how a reply is asked for (`Decoding`), one reply's state and its one step (`Sequence`),
the decoder calls (`prefill`, `decode_one_token`) and the loop over a batch (`generate`).

    prefill(decoder, cache, prompt)                          the prompt's call
    decode_one_token(decoder, cache, embeddings, tokens, d)  one new token per row
    Sequence.step(outputs, row)                              the row's next token: chosen (its Guide with its
                                                             SamplingOptions), streamed (StreamDecoder, stop
                                                             strings, logprobs), its finish reason decided
    generate(decoder, cache, embeddings, prompt, sequences)  prefill, then steps until every row is done

Every reply is made through `Sequence.step`: `Pipeline` (run, chat, the Python API) drives a batch with
`generate`; the server's schedulers (serve/scheduler/) call the same step for rows of a shared cache. The decoder
graph is one function of (inputs_embeds, position_ids, the cache's length inputs, past KV) -> (each row's last
logits, their argmax, present KV); kv_cache.py owns what the cache feeds and how it takes a call's outputs in. A
finished row keeps receiving the pad token (as transformers does) until every row is done. Greedy decoding
without a repetition penalty reads the graph's own `next_token`, so a device runner may keep the [B, vocab]
logits on the device and bring back B integers per step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.runtime.backends.runner import Runner
from edgevl.runtime.guide import Guide, OutputOptions
from edgevl.runtime.inputs.prompt import StreamDecoder
from edgevl.runtime.inputs.rope_index import text_position_ids
from edgevl.runtime.logprobs import TokenLogprob
from edgevl.runtime.sampling import HostOutputs, SamplingOptions


@dataclass(frozen=True)
class Decoding:
    """How a reply is made: its sampling (validated once, where the request entered), its length, its stop
    strings, and what it reports or constrains beyond sampling (logprobs, logit bias, penalties, a grammar)."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    output: OutputOptions = field(default_factory=OutputOptions)


@dataclass
class Timings:
    """Where a reply's time went (seconds)."""

    preprocess_s: float = 0.0                  # planning, decoding and preprocessing its images and videos, tokens
    vision_s: float = 0.0                      # the vision encoder's calls
    prefill_s: float = 0.0                     # the prompt's decoder call(s)
    decode_s_per_token: list[float] = field(default_factory=list)   # each decode step
    load_s: float = 0.0                        # the pipeline's load (once per process)
    queue_s: float | None = None               # a scheduler's: accepted -> given a row
    ttft_s: float | None = None                # a scheduler's: accepted -> first token
    cached_tokens: int = 0                     # prompt positions taken from a kept KV cache (--prefix-cache)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str                        # "eos" | "stop" | "length"
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None    # per token of `text`, when asked (OutputOptions.top_logprobs)

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "timings": self.timings.to_json()}


class Sequence:
    """One reply being generated: the context its tokens are chosen in, its Guide and sampling, its text so far.

    `step` is the only way a token is taken, whoever drives the decoder. Text goes to `on_text(delta)` as it is
    printed (stop strings held back), each delta after `on_logprobs(entries)` for the tokens it holds; EOS, a stop
    string or `max_new_tokens` end it (`finish_reason`).
    """

    def __init__(self, decoding: Decoding, guide: Guide, stream: StreamDecoder, context: np.ndarray,
                 eos_ids: tuple[int, ...], max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 on_logprobs: Callable[[list[TokenLogprob]], None] | None = None):
        self.decoding, self.guide, self.stream, self.eos_ids = decoding, guide, stream, tuple(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.on_text, self.on_logprobs = on_text, on_logprobs
        self.prompt_len = len(context)
        self.context = np.zeros(self.prompt_len + max_new_tokens, np.int64)   # prompt ids, then generated ids
        self.context[:self.prompt_len] = context
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, outputs: HostOutputs, index: int) -> int:
        """Take row `index` of a decoder call's outputs: choose the next token, stream its text, decide whether
        the reply is finished. Returns the token (fed back at the next decode step unless `done`)."""
        n = self.prompt_len + len(self.tokens)
        token = self.guide.choose(outputs, index, self.context[:n], self.decoding.sampling)
        self.context[n] = token
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "eos"
        else:
            self._tell(self.stream.push(token))
            if self.stream.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.done:
            self._tell(self.stream.finish())
        return token

    def _tell(self, delta: str) -> None:
        entries = self.guide.released(self.stream)
        if entries and self.on_logprobs:
            self.on_logprobs(entries)
        if delta and self.on_text:
            self.on_text(delta)

    def result(self, prompt_token_ids: list[int], timings: Timings) -> Result:
        return Result([int(t) for t in prompt_token_ids], list(self.tokens), self.stream.text,
                      self.finish_reason or "length", timings, self.guide.reply_logprobs(self.stream))


@dataclass
class Prompt:
    """A padded batch of prompts (or of new turns after a cached prefix), ready for prefill."""

    embeds: np.ndarray           # [B, S, H] the tokens not yet in the cache, padded on the cache's side
    context_ids: np.ndarray      # [B, T] every token of the context (cached + new, padded): repetition penalty
    position_ids: np.ndarray     # [3, B, S] M-RoPE ids of the new tokens
    rope_deltas: np.ndarray      # [B, 1] from mrope_position_ids: decode positions = real length + delta
    new_tokens: np.ndarray       # [B] real (not padding) tokens per row in `embeds`
    deepstack: np.ndarray | None = None   # Qwen3-VL: [levels, B, S, H] vision features added after the first layers


def decoder_step(decoder: Runner, cache, embeds: np.ndarray, position_ids: np.ndarray, new: np.ndarray,
                 deepstack: np.ndarray | None = None) -> dict:
    """One decoder call adding new[b] tokens to row b of `cache`; returns the graph's outputs (logits, next_token).
    deepstack: Qwen3-VL's [levels, B, S, H] vision features for these positions; zeros when not given (text, decode
    steps) to a decoder that takes them."""
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: position_ids, **cache.feed(new, embeds.shape[1])}
    levels = deepstack_levels(decoder)
    if levels:
        feed[names.DEEPSTACK_EMBEDS] = deepstack if deepstack is not None else \
            np.zeros((levels, *embeds.shape), embeds.dtype)
    outputs = decoder.infer(feed, cache.bindings())
    cache.advance(outputs, new)
    return outputs


def deepstack_levels(decoder: Runner) -> int:
    """How many DeepStack levels a decoder takes (Qwen3-VL), 0 when it takes none."""
    meta = decoder.input_metadata().get(names.DEEPSTACK_EMBEDS)
    return int(meta.shape[0]) if meta is not None else 0


def prefill(decoder: Runner, cache, prompt: Prompt) -> dict:
    return decoder_step(decoder, cache, prompt.embeds, prompt.position_ids, prompt.new_tokens, prompt.deepstack)


def decode_one_token(decoder: Runner, cache, embeddings, tokens: np.ndarray, rope_deltas: np.ndarray) -> dict:
    """tokens [B] just chosen -> the graph's outputs for the next position.

    New tokens are text: all three M-RoPE rows equal each row's real length + rope_deltas.
    embeddings: runtime.embeddings.EmbeddingTable (rows in the decoder's input dtype).
    """
    embeds = embeddings.rows(tokens)[:, None, :]                                               # [B, 1, H]
    position_ids = text_position_ids(cache.real_lengths, rope_deltas)                         # [3, B, 1]
    return decoder_step(decoder, cache, embeds, position_ids, np.ones(len(tokens), np.int64))


def generate(decoder: Runner, cache, embeddings, prompt: Prompt, sequences: list[Sequence], pad_id: int,
             timings: Timings) -> None:
    """Prefill `prompt` (row b's reply is sequences[b]), then step every unfinished row until all are done;
    adds the prefill and each decode step to `timings`."""
    t0 = time.perf_counter()
    outputs = prefill(decoder, cache, prompt)
    timings.prefill_s += time.perf_counter() - t0
    while True:
        host = HostOutputs(outputs)
        tokens = np.full(len(sequences), pad_id, np.int64)
        for b, seq in enumerate(sequences):
            if not seq.done:
                tokens[b] = seq.step(host, b)
        if all(seq.done for seq in sequences):
            return
        t0 = time.perf_counter()
        outputs = decode_one_token(decoder, cache, embeddings, tokens, prompt.rope_deltas)
        timings.decode_s_per_token.append(time.perf_counter() - t0)
