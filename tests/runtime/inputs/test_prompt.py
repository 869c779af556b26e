"""The streaming detokenizer (runtime/inputs/prompt.py's StreamDecoder): it never prints part of a stop string, and
the text it streams equals decoding all ids at once, on real text and on random ids."""

from __future__ import annotations

import random

import pytest


class _CharTokenizer:
    """Token i decodes to chr(i): enough to drive StreamDecoder without a real vocabulary."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stream_decoder_never_prints_part_of_a_stop_string():
    from edgevl.runtime.inputs.prompt import StreamDecoder
    stream = StreamDecoder(_CharTokenizer(), stop=("END",))
    printed = "".join(stream.push(ord(c)) for c in "hello ENaEND more")
    assert stream.stopped
    assert printed + stream.finish() == "hello ENa"
    assert stream.text == "hello ENa"
    held = StreamDecoder(_CharTokenizer(), stop=("END",))
    assert "".join(held.push(ord(c)) for c in "abcEN") == "abc"   # "EN" could start "END": held back
    assert held.finish() == "EN" and held.text == "abcEN"


class _ReferenceStream:
    """The straightforward StreamDecoder: decode all ids on every token, look for stop strings in all of it."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids, self.text, self.printed, self.stopped = [], "", 0, False

    def push(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._release(len(self.text))
        self.text = text
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._release(len(text) - held)

    def finish(self):
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._release(len(self.text))

    def _release(self, upto):
        delta = self.text[self.printed:upto]
        self.printed = max(self.printed, upto)
        return delta


def _stream(decoder, ids):
    """Push ids until a stop string is seen (as the pipeline does); every delta, then `text` and `stopped`."""
    deltas = []
    for i in ids:
        deltas.append(decoder.push(i))
        if decoder.stopped:
            break
    return deltas + [decoder.finish()], decoder.text, decoder.stopped


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_artifact):
    from edgevl.runtime.inputs.prompt import Tokenizer
    return Tokenizer(tiny_artifact / "tokenizer.json")


STREAM_TEXTS = [  # the tiny tokenizer spells CJK and emoji byte by byte: their characters span tokens
    "Hello, world! 你好，世界 🙂👍🏽 café",
    "The robot learns to paint.\n\nIt paints 🎨 every day — 毎日.",
    "日本語のテキスト and emoji 👩‍👩‍👧 mixed with ASCII",
]


def _stop_sets(text):
    wide = next(i for i, c in enumerate(text) if ord(c) > 127)
    return [
        (),                                       # no stop strings
        (text[:2],),                              # a stop string at the very start
        (text[9:17],),                            # one that spans several tokens
        (text[wide:wide + 2],),                   # one that starts with a multi-byte character
        (text[-4:], text[14:16], "never there"),  # several: the earliest match wins
        (text[5:9] + "\x00",),                    # its start is held back, then released
        (text[-3:] + "!!",),                      # its start ends the text: held back until finish()
    ]


def test_stream_decoder_matches_full_redecoding_on_real_text(tiny_tokenizer):
    from edgevl.runtime.inputs.prompt import StreamDecoder
    rng = random.Random(0)
    for text in STREAM_TEXTS:
        cuts = [sorted(rng.sample(range(1, len(text)), 4)) for _ in range(3)]
        pieces = [[text[a:b] for a, b in zip([0, *c], [*c, len(text)])] for c in cuts]
        pieces.append(list(text))                 # one character at a time
        tokenizations = [tiny_tokenizer.encode(text).tolist()]
        tokenizations += [[i for p in ps for i in tiny_tokenizer.encode(p).tolist()] for ps in pieces]
        for ids in tokenizations:
            assert tiny_tokenizer.decode(ids) == text
            for stop in _stop_sets(text):
                ours = _stream(StreamDecoder(tiny_tokenizer, stop), ids)
                assert ours == _stream(_ReferenceStream(tiny_tokenizer, stop), ids), (text, ids, stop)
                assert ours[2] == any(s in text for s in stop)


def test_stream_decoder_matches_full_redecoding_on_random_ids(tiny_tokenizer):
    """Random ids (half of them single-byte tokens, so broken and split UTF-8 is common) and stop strings."""
    from edgevl.runtime.inputs.prompt import StreamDecoder
    rng = random.Random(0)
    vocab = tiny_tokenizer.impl.get_vocab_size()  # special tokens included: they decode to nothing
    stopped = 0
    for _ in range(400):
        ids = [rng.randrange(256) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        full = tiny_tokenizer.decode(ids)
        stop = []
        for _ in range(rng.randrange(4)):
            if full and rng.random() < 0.7:
                at = rng.randrange(len(full))
                stop.append(full[at:at + rng.randrange(1, 8)])
            else:
                stop.append(rng.choice(["the", "\ufffd\ufffd", "END", " a"]))
        ours = _stream(StreamDecoder(tiny_tokenizer, tuple(stop)), ids)
        assert ours == _stream(_ReferenceStream(tiny_tokenizer, tuple(stop)), ids), (ids, stop)
        stopped += ours[2]
    assert 100 < stopped < 350


def test_stream_decoder_decodes_only_recent_ids(tiny_tokenizer):
    """Each push decodes a few ids, however long the stream: streaming N tokens costs O(N), not O(N^2)."""
    from edgevl.runtime.inputs.prompt import StreamDecoder
    sizes = []

    class Counting:
        def decode(self, ids):
            sizes.append(len(ids))
            return tiny_tokenizer.decode(ids)

    ids = [i for text in STREAM_TEXTS for i in tiny_tokenizer.encode(text).tolist()] * 20
    stream = StreamDecoder(Counting(), stop=("never there",))
    printed = "".join(stream.push(i) for i in ids)
    assert max(sizes) <= 10
    assert printed + stream.finish() == "".join(STREAM_TEXTS) * 20


def test_stream_decoder_keeps_context_for_decoders_that_change_the_first_token():
    """Like SentencePiece, which drops the leading space of the text: the window's context keeps it right."""
    from edgevl.runtime.inputs.prompt import StreamDecoder

    class LeadingSpaceDropped(_CharTokenizer):
        def decode(self, ids):
            return super().decode(ids).removeprefix(" ")

    rng = random.Random(0)
    for _ in range(200):
        ids = [ord(rng.choice("ab  \n")) for _ in range(rng.randrange(1, 20))]
        stop = tuple(rng.sample(["a b", " \n", "bb", "a"], rng.randrange(3)))
        ours = _stream(StreamDecoder(LeadingSpaceDropped(), stop), ids)
        assert ours == _stream(_ReferenceStream(LeadingSpaceDropped(), stop), ids), (ids, stop)
