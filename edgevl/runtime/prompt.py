"""Prompt -> token ids: the model's own chat template (jinja2) and vision-pad expansion.

The chat template puts one `<|image_pad|>` between `<|vision_start|>` and
`<|vision_end|>` per image; like transformers' Qwen2VLProcessor we expand it to
`t*h*w / merge_size**2` pads (one per merged vision token) before tokenizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgevl.errors import EdgevlError


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """Renders messages with a Hugging Face chat template, in the same jinja environment transformers uses."""

    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        self.template = env.from_string(source)

    @classmethod
    def from_file(cls, path: Path) -> "ChatTemplate":
        return cls(Path(path).read_text())

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except TemplateError as e:
            raise EdgevlError(f"the model's chat template rejected the messages: {e}") from None


def user_message(text: str, num_images: int = 0, num_videos: int = 0) -> dict:
    """One user turn in the Hugging Face content-list format: images, then videos, then the text."""
    content = [{"type": "image"} for _ in range(num_images)]
    content += [{"type": "video"} for _ in range(num_videos)]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def expand_vision_pads(text: str, pad_token: str, grids: list[tuple[int, int, int]], merge_size: int) -> str:
    """Replace the i-th `pad_token` with t*h*w/merge^2 copies of itself (grids[i] = (t, h, w))."""
    pieces = text.split(pad_token)
    if len(pieces) - 1 != len(grids):
        raise EdgevlError(f"the prompt has {len(pieces) - 1} {pad_token} placeholders but {len(grids)} "
                          f"inputs were given for them.")
    out = [pieces[0]]
    for (t, h, w), piece in zip(grids, pieces[1:]):
        out.append(pad_token * (t * h * w // merge_size ** 2))
        out.append(piece)
    return "".join(out)


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (no transformers)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        self.impl = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.impl.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.impl.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas for streaming.

    Holds back an incomplete UTF-8 character, and any tail that could be the start
    of a stop string, so a stop string is never printed even in part. `text` is the
    final output (cut before the first stop string); `finish()` releases what is held.
    Each token costs time for a few recent ids only (the way text-generation-inference
    streams), not for the whole text so far.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.printed = 0
        self.stopped = False
        self._read = 0          # ids[:_read] are in `text` (the text ended on a whole character there)
        self._prefix = 0        # the read point before that: each push decodes ids[_prefix:]
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now safe to print."""
        self.ids.append(int(token_id))
        if self.stopped:  # generation ends at the stop string
            return ""
        # Decode only ids[_prefix:], not all ids (which made streaming N tokens cost O(N^2)). _prefix is
        # the read point before the last one: the text ended on a whole character there, so the window
        # cuts no UTF-8 character, and ids[_prefix:_read] give context to decoders that change a first
        # token (SentencePiece drops its leading space). The new text is what the window adds to them.
        window = self.tokenizer.decode(self.ids[self._prefix:])
        if window.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        new = window[len(self._prefix_text):]
        if not new:  # e.g. a special token: nothing changes
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        old, self.text = len(self.text), self.text + new
        # A stop string must end in the new text: one that ends earlier was found by an earlier push.
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        return self._release(len(self.text) - self._held_tail(self.text))

    def flush(self) -> str:
        return self._release(len(self.text))

    def finish(self) -> str:
        """End of generation: the full text (even a trailing partial character) and what is left to print."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self.flush()

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _release(self, upto: int) -> str:
        delta = self.text[self.printed:upto]
        self.printed = max(self.printed, upto)
        return delta
