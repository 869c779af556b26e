"""Greedy generation: the torch-free runtime vs transformers' generate(), token for token.

The transformers side (tests/hf_reference.py and the `hf_inputs` fixture) builds its
inputs the way Qwen2VLProcessor does.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.hf_reference import NEW_TOKENS, hf_generate, strip_after_eos

CASES = {
    "one_image": ("Describe this image in detail.", ["astronaut"]),
    "odd_sized_image": ("What is in the picture?", ["chelsea_odd"]),
    "grayscale_image": ("What is shown?", ["camera_gray"]),
    "rgba_image": ("Describe the rocket.", ["rocket_rgba"]),
    "two_images": ("Compare the two pictures.", ["astronaut", "coffee"]),
    "text_only": ("Write a short story about a robot who learns to paint.", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, any_pipeline, hf_model, hf_inputs, photos):
    pipeline = any_pipeline
    prompt, names = CASES[case]
    paths = [photos[n] for n in names]
    ids, extra = hf_inputs(prompt, paths)
    ours = pipeline.generate(prompt, images=paths, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.prompt_token_ids == ids[0].tolist()
    ref = hf_generate(hf_model, ids, extra)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config.eos_token_id)
    assert len(ours.token_ids) >= NEW_TOKENS or ours.finish_reason == "eos"


def test_greedy_without_repetition_penalty(any_pipeline, hf_model, hf_inputs, photos):
    pipeline = any_pipeline
    ids, extra = hf_inputs("Tell me about the cup.", [photos["coffee"]])
    ours = pipeline.generate("Tell me about the cup.", images=[photos["coffee"]], max_new_tokens=NEW_TOKENS,
                             do_sample=False, repetition_penalty=1.0)
    ref = hf_generate(hf_model, ids, extra, repetition_penalty=1.0)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config.eos_token_id)


def test_batch_of_two_prompts_of_different_lengths(any_pipeline, hf_model, hf_inputs, photos):
    """A batch (right-padded for the in-place cache, left-padded for the concat one): each row equals
    transformers' left-padded batched generate (and its own single run)."""
    pipeline = any_pipeline
    prompts = ["Describe this image.", "A much longer question about the second picture, asked in many words?"]
    images = [[photos["astronaut"]], [photos["coffee"]]]
    ours = pipeline.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, do_sample=False)
    built = [hf_inputs(p, imgs) for p, imgs in zip(prompts, images)]
    width = max(ids.shape[1] for ids, _ in built)
    pad = pipeline.config.pad_token_id
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, (row, _) in enumerate(built):
        ids[b, width - row.shape[1]:] = row[0]
        mask[b, width - row.shape[1]:] = 1
    extra = {"pixel_values": torch.cat([e["pixel_values"] for _, e in built]),
             "image_grid_thw": torch.cat([e["image_grid_thw"] for _, e in built])}
    ref = hf_generate(hf_model, ids, extra, attention_mask=mask)
    for b in range(2):
        assert ours[b].token_ids == strip_after_eos(ref[b].tolist(), pipeline.config.eos_token_id)
        single = pipeline.generate(prompts[b], images=images[b], max_new_tokens=NEW_TOKENS, do_sample=False)
        assert single.token_ids == ours[b].token_ids


def test_sampling_is_reproducible_with_a_seed(pipeline, photos):
    kwargs = dict(images=[photos["coffee"]], max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50,
                  top_p=0.9, seed=123)
    a = pipeline.generate("Say something.", **kwargs)
    b = pipeline.generate("Say something.", **kwargs)
    c = pipeline.generate("Say something.", **{**kwargs, "seed": 7})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_and_streaming(pipeline):
    full = pipeline.generate("Write a short story about a robot.", max_new_tokens=16, do_sample=False)
    assert len(full.text) > 4
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    pieces = []
    cut = pipeline.generate("Write a short story about a robot.", max_new_tokens=16, do_sample=False,
                            stop=[stop], on_text=pieces.append)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in "".join(pieces) and full.text.startswith("".join(pieces))


def test_timings_are_reported(pipeline, photos):
    r = pipeline.generate("Hi", images=[photos["coffee"]], max_new_tokens=5, do_sample=False)
    t = r.timings
    assert t.vision_s > 0 and t.prefill_s > 0 and t.preprocess_s > 0
    assert len(t.decode_s_per_token) == len(r.token_ids) - 1


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
