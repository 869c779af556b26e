"""Next-token choice: from logits, pure numpy functions in transformers' order; from a decoder call's outputs,
`choose_row` (the graph's own argmax when decoding is plain greedy) over `HostOutputs`.

transformers applies the repetition penalty (a logits processor) first, then the
warpers temperature -> top-k -> top-p, then samples; greedy is a plain argmax.

`validate_sampling` is the one check of sampling values: `SamplingOptions` runs it, so the
Python API, `edgevl run`, `edgevl chat` and the server (its request schema calls it too, to
answer 400 before anything runs) accept and refuse exactly the same values.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from edgevl.artifact import names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.tensors import to_host

MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1          # numpy's default_rng takes any non-negative int; 63 bits is plenty

# What each option must be, as the end of "NAME must be ...".
SAMPLING_RULES = {
    "do_sample": "true or false",
    "temperature": f"a number from 0 to {MAX_TEMPERATURE:g} (0 = greedy)",
    "top_k": "a whole number of at least 0 (0 = off)",
    "top_p": "a number greater than 0 and at most 1 (1 = off)",
    "repetition_penalty": "a number greater than 0 (1 = off)",
    "seed": "a whole number from 0 to 2**63 - 1",
}


def show_value(value) -> str:
    """A short repr of a user's value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def sampling_problem(name: str, value) -> str | None:
    """Why `value` is not a valid sampling option `name` ("must be ..."), or None when it is valid."""
    if name == "do_sample":
        ok = isinstance(value, (bool, np.bool_))
    elif name == "temperature":
        ok = _is_real(value) and math.isfinite(value) and 0 <= value <= MAX_TEMPERATURE
    elif name == "top_k":
        ok = _is_int(value) and value >= 0
    elif name == "top_p":
        ok = _is_real(value) and math.isfinite(value) and 0 < value <= 1
    elif name == "repetition_penalty":
        ok = _is_real(value) and math.isfinite(value) and value > 0
    elif name == "seed":
        ok = _is_int(value) and 0 <= value <= MAX_SEED
    else:
        raise KeyError(name)
    return None if ok else f"must be {SAMPLING_RULES[name]}"


def validate_sampling(temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None,
                      do_sample=None, source: str | None = None) -> None:
    """Raise EdgevlError (one sentence naming the option) for the first invalid value; None = not given.

    source: where the values came from, named in the sentence (e.g. "generation_config.json").
    """
    values = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "repetition_penalty": repetition_penalty, "seed": seed}
    for name, value in values.items():
        if value is None:
            continue
        problem = sampling_problem(name, value)
        if problem:
            where = f" in {source}" if source else ""
            raise EdgevlError(f"{name}{where} {problem}, got {show_value(value)}.")


@dataclass
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1.0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed,
                          self.do_sample)
        if self.temperature == 0:
            self.do_sample = False    # as the server has always read temperature 0: greedy
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingOptions":
        """Defaults from the model's generation_config.json; explicit overrides (not None) win.

        A value from the file that is wrong (a string temperature, ...) is refused naming the file."""
        if not isinstance(gen, dict):
            raise EdgevlError(f"generation_config.json must hold a JSON object, got {type(gen).__name__}.")
        keys = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
        from_file = {k: gen[k] for k in keys if gen.get(k) is not None and overrides.get(k) is None}
        validate_sampling(**from_file, source="generation_config.json")
        values = {**from_file, **{k: v for k, v in overrides.items() if v is not None}}
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


class HostOutputs:
    """A decoder call's outputs, each brought to the host once, when a row first asks for it (a device runner may
    keep [B, vocab] logits on the GPU: greedy rows read only `next_token`)."""

    def __init__(self, outputs: dict):
        self.outputs, self.host = outputs, {}

    def __contains__(self, name: str) -> bool:
        return name in self.outputs

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.host:
            self.host[name] = to_host(self.outputs[name])
        return self.host[name]


def choose_row(outputs: HostOutputs, index: int, context: np.ndarray, opts: SamplingOptions) -> int:
    """Row `index`'s next token: the graph's own argmax when decoding is plain greedy, else chosen from its logits
    with `opts` (context [T]: prompt + generated ids, for the repetition penalty)."""
    if not opts.do_sample and opts.repetition_penalty == 1.0 and names.NEXT_TOKEN in outputs:
        return int(outputs[names.NEXT_TOKEN][index])
    return int(next_tokens(outputs[names.LOGITS][index:index + 1], context[None], opts)[0])
