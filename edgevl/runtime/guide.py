"""What a request asks of its tokens beyond sampling (`OutputOptions`), and the per-request `Guide` that does it.

A Guide chooses one row's next token from a decoder call's outputs. With nothing to change in the logits it makes
`sampling.choose_row`'s choice (the graph's argmax for plain greedy, so asking for logprobs never changes a
token); otherwise it takes the row's logits to the host and, in this order, subtracts the frequency and presence
penalties (OpenAI's: per earlier occurrence in the reply, and once), adds the logit bias and masks what the
grammar forbids, then chooses with the request's `SamplingOptions` (repetition penalty, temperature, top-k,
top-p) as `sampling.next_tokens` does. Logprobs are the raw logits' (logprobs.py), whatever was applied.

Logprobs follow the text: `released(stream)` gives the entries of the tokens whose text the row's
`StreamDecoder` has printed since the last call (a streamed reply sends them with that text), `reply_logprobs`
the tokens of the final reply (EOS is not part of it; after a stop string, the tokens that begin before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.artifact import names
from edgevl.runtime.logprobs import TokenLogprob, token_logprob
from edgevl.runtime.sampling import SamplingOptions, choose_row, next_tokens


@dataclass(frozen=True)
class OutputOptions:
    top_logprobs: int | None = None                 # None: no logprobs; n: the chosen token's and the n most likely
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    frequency_penalty: float = 0.0                  # times the token's count in the reply so far, subtracted
    presence_penalty: float = 0.0                   # subtracted once the token is in the reply
    grammar: str | None = None                      # Lark (constrained.py) the reply must match

    @property
    def changes_logits(self) -> bool:
        return bool(self.logit_bias or self.frequency_penalty or self.presence_penalty or self.grammar)

    @property
    def plain(self) -> bool:
        return self == OutputOptions()


class Guide:
    """One request's choices; `constraint`: its grammar's TokenConstraint (options.grammar compiled)."""

    def __init__(self, options: OutputOptions, constraint=None):
        self.options, self.constraint = options, constraint
        self.logprobs: list[TokenLogprob] | None = [] if options.top_logprobs is not None else None
        self.sent = 0                                   # logprobs entries handed out by `released`
        self.counts: dict[int, int] = {}                # token -> times chosen so far
        bias = options.logit_bias
        self.bias_ids = np.array([t for t, _ in bias], np.int64)
        self.bias_values = np.array([b for _, b in bias], np.float32)

    def choose(self, outputs, index: int, context: np.ndarray, opts: SamplingOptions) -> int:
        """Row `index`'s next token (outputs: sampling.HostOutputs; context [T]: prompt + generated ids)."""
        if self.options.changes_logits:
            logits = np.array(outputs[names.LOGITS][index], np.float32)
            self._adjust(logits)
            token = int(next_tokens(logits[None], context[None], opts)[0])
        else:
            token = choose_row(outputs, index, context, opts)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(outputs[names.LOGITS][index], token, self.options.top_logprobs))
        if self.constraint is not None:
            self.constraint.accept(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _adjust(self, logits: np.ndarray) -> None:
        o = self.options
        if self.counts and (o.frequency_penalty or o.presence_penalty):
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            seen = np.fromiter(self.counts.values(), np.float32, len(self.counts))
            logits[ids] -= seen * np.float32(o.frequency_penalty) + np.float32(o.presence_penalty)
        if len(self.bias_ids):
            logits[self.bias_ids] += self.bias_values
        if self.constraint is not None:
            self.constraint.mask(logits)

    def released(self, stream) -> list[TokenLogprob]:
        """Entries of the tokens whose text `stream` has printed since the last call."""
        if self.logprobs is None:
            return []
        upto = stream.shown_tokens()
        out, self.sent = self.logprobs[self.sent:upto], max(self.sent, upto)
        return out

    def reply_logprobs(self, stream) -> list[TokenLogprob] | None:
        return None if self.logprobs is None else self.logprobs[:stream.reply_tokens()]
