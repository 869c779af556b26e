"""Prompt -> token ids: messages, vision-pad expansion, the tokenizer, and streaming text back out.

The chat template (template.py) puts one `<|image_pad|>` between `<|vision_start|>` and
`<|vision_end|>` per image; like transformers' Qwen2VLProcessor we expand it to
`t*h*w / merge_size**2` pads (one per merged vision token) before tokenizing.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from pathlib import Path

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import PromptTooLong


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


MAX_TOKENIZER_BYTES = 128 << 20       # Qwen2-VL's tokenizer.json is 7 MB


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (no transformers)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise EdgevlError(f"{path} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB; it is not a tokenizer.")
        try:
            self.impl = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for every kind of bad file
            raise EdgevlError(f"{path} is not a tokenizer the tokenizers library can load "
                              f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}).") from None
        vocab = self.impl.get_vocab(with_added_tokens=True)
        # Every token stands for at most this many bytes of text: a lower bound on a text's token count.
        self.max_token_bytes = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1) or 1
        self._bytes: dict[int, bytes] = {}       # token_bytes, as tokens are asked for

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.impl.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def encode_bounded(self, text: str, max_tokens: int) -> np.ndarray:
        """encode(text), refused before tokenizing when the text is surely longer than `max_tokens` tokens
        or is not valid Unicode (a lone surrogate from an undecodable argv or stdin)."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise EdgevlError(f"the prompt is not valid UTF-8 text (character {e.start} cannot be encoded); "
                              f"check the input's encoding.") from None
        if size > max_tokens * self.max_token_bytes:
            least = size // self.max_token_bytes
            raise PromptTooLong(f"the prompt is at least {least} tokens long but the model's context is {max_tokens} "
                                f"tokens; shorten it or use smaller images or shorter videos.", least, max_tokens)
        return self.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.impl.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to decoded text: b"" for a special token (`decode` skips them), the raw bytes
        of a byte-level BPE piece (which can be part of a UTF-8 character), else its decoded text's UTF-8."""
        token_id = int(token_id)
        if token_id not in self._bytes:
            piece = self.impl.id_to_token(token_id)
            added = self._added.get(token_id)
            if piece is None or added is not None and added.special:
                value = b""
            elif added is None and self._byte_level and all(c in _BYTE_OF for c in piece):
                value = bytes(_BYTE_OF[c] for c in piece)
            else:
                value = self.decode([token_id]).encode("utf-8")
            self._bytes[token_id] = value
        return self._bytes[token_id]

    @functools.cached_property
    def _added(self) -> dict:
        return self.impl.get_added_tokens_decoder()

    @functools.cached_property
    def _byte_level(self) -> bool:
        from tokenizers.decoders import ByteLevel
        return isinstance(self.impl.decoder, ByteLevel)


def _gpt2_byte_map() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's bytes_to_unicode)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


_BYTE_OF = _gpt2_byte_map()


class StreamDecoder:
    """Turns a growing list of token ids into text deltas for streaming.

    Holds back an incomplete UTF-8 character, and any tail that could be the start
    of a stop string, so a stop string is never printed even in part. `text` is the
    final output (cut before the first stop string); `finish()` releases what is held.
    Each token costs time for a few recent ids only (the way text-generation-inference
    streams), not for the whole text so far. `starts[i]` is where token i's text begins in `text`,
    so per-token data (logprobs) can follow the text: `shown_tokens`, `reply_tokens`.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.text = ""
        self.printed = 0
        self.stopped = False
        self._read = 0          # ids[:_read] are in `text` (the text ended on a whole character there)
        self._prefix = 0        # the read point before that: each push decodes ids[_prefix:]
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now safe to print."""
        self.ids.append(int(token_id))
        self.starts.append(len(self.text))
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

    def shown_tokens(self) -> int:
        """How many tokens (from the first) have their text begin in what was printed so far."""
        return bisect_left(self.starts, self.printed)

    def reply_tokens(self) -> int:
        """How many tokens make the final text: all of them, or after a stop string those that begin before it."""
        return bisect_left(self.starts, len(self.text)) if self.stopped else len(self.ids)

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _release(self, upto: int) -> str:
        delta = self.text[self.printed:upto]
        self.printed = max(self.printed, upto)
        return delta
