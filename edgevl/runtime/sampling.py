"""Next-token choice from logits: pure numpy functions, in transformers' order.

transformers applies the repetition penalty (a logits processor) first, then the
warpers temperature -> top-k -> top-p, then samples; greedy is a plain argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1.0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingOptions":
        """Defaults from the model's generation_config.json; explicit overrides (not None) win."""
        values = {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
                  if gen.get(k) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def apply_repetition_penalty(logits: np.ndarray, context_ids: np.ndarray, penalty: float) -> np.ndarray:
    """logits [B, V]; context_ids [B, T]. Seen tokens: positive logits / penalty, negative * penalty."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    rows = np.arange(logits.shape[0])[:, None]
    seen = logits[rows, context_ids]
    logits[rows, context_ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1)                      # ascending, as transformers sorts
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[:, -1] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return z / np.sum(z, axis=-1, keepdims=True)


def next_tokens(logits: np.ndarray, context_ids: np.ndarray, opts: SamplingOptions) -> np.ndarray:
    """logits [B, V] float, context_ids [B, T] (prompt + generated so far) -> next ids [B]."""
    logits = apply_repetition_penalty(logits.astype(np.float32), context_ids, opts.repetition_penalty)
    if not opts.do_sample:
        return np.argmax(logits, axis=-1)
    logits = logits / max(opts.temperature, 1e-5)
    logits = apply_top_p(apply_top_k(logits, opts.top_k), opts.top_p)
    probs = softmax(logits.astype(np.float64))  # float64 so rows sum to 1 within choice()'s tolerance
    return np.array([opts.rng.choice(probs.shape[-1], p=row) for row in probs])
