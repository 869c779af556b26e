"""Constrained decoding: a reply that must match a grammar (JSON Schema, tool calls), through llguidance.

llguidance (Microsoft's; llama.cpp and vLLM use it) computes, per step, the set of tokens that keep the text
a prefix of the grammar's language over the model's own vocabulary (read from tokenizer.json, no transformers).
It is optional: imported here only, when a request asks for structured output; without it such a request is
refused with a sentence naming the extra that installs it.

Grammars are llguidance's Lark dialect (`start: %json {schema}` embeds a JSON Schema); `json_grammar` and the
server's tool-call grammars write them. `GrammarCompiler` (one per pipeline: the tokenizer's token trie is built
once) checks a grammar and makes a `TokenConstraint` per request: `mask(logits)` sets the logits of tokens
the grammar forbids to -inf (EOS is allowed once the text is complete, and is then the only choice), `accept`
advances it by the chosen token.
"""

from __future__ import annotations

import json
import re

import numpy as np

from edgevl.errors import EdgevlError

EXTRA_HINT = "install it with `pip install 'edgevl[serve]'` (or `pip install llguidance`)"


class GrammarUnavailable(EdgevlError):
    """llguidance is not installed."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarUnavailable(f"structured output (a JSON schema or required tool calls) needs the llguidance "
                                 f"package, which is not installed; {EXTRA_HINT}.") from None
    return llguidance


def json_grammar(schema: dict) -> str:
    """A Lark grammar for one JSON value matching `schema`, without optional whitespace (compact JSON: a model
    cannot spend its tokens on blanks)."""
    return f"start: {json_rule(schema)}"


def json_rule(schema: dict) -> str:
    """The Lark expression of one compact JSON value matching `schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


class GrammarCompiler:
    """Grammars over one tokenizer: `problem` checks one, `constraint` starts a request's matcher."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: tuple[int, ...]):
        llg = _llguidance()
        self.llg, self.vocab_size, self.eos = llg, vocab_size, tuple(eos_ids)
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids))

    def problem(self, grammar: str) -> str | None:
        """Why `grammar` (Lark) cannot be used (llguidance's first line, without its position in the grammar
        text, which the user did not write), or None."""
        message = self.llg.LLMatcher.validate_grammar(self.llg.LLMatcher.grammar_from_lark(grammar), self.tokenizer)
        if not message or message.startswith("WARNING"):
            return None
        return re.sub(r"^at \d+\(\d+\): ", "", message.strip().splitlines()[0])

    def constraint(self, grammar: str) -> "TokenConstraint":
        matcher = self.llg.LLMatcher(self.tokenizer, self.llg.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():
            raise EdgevlError(f"the grammar cannot be used: {matcher.get_error().strip().splitlines()[0]}.")
        return TokenConstraint(matcher, self.vocab_size, self.eos)


class TokenConstraint:
    """One request's grammar state."""

    def __init__(self, matcher, vocab_size: int, eos: tuple[int, ...]):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.bitmask = np.full((vocab_size + 31) // 32, -1, np.int32)

    def mask(self, logits: np.ndarray) -> None:
        """logits [V] in place: -inf for every token the grammar does not allow next."""
        if self.matcher.is_error():     # cannot happen for tokens `mask` allowed; end the reply if it does
            allowed = np.zeros(self.vocab_size, bool)
            allowed[self.eos[0]] = True
        else:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.vocab_size].astype(bool)
        logits[~allowed] = -np.inf

    def accept(self, token: int) -> None:
        if token not in self.eos:
            self.matcher.consume_token(int(token))
