"""Greedy generation: the torch-free runtime vs transformers' generate(), token for token.

The transformers side (tests/hf_reference.py and the `hf_inputs` fixture) builds its
inputs the way Qwen2VLProcessor does.
"""

from __future__ import annotations

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
def test_greedy_tokens_equal_transformers(case, pipeline, hf_model, hf_inputs, photos):
    prompt, names = CASES[case]
    paths = [photos[n] for n in names]
    ids, extra = hf_inputs(prompt, paths)
    ours = pipeline.generate(prompt, images=paths, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.prompt_token_ids == ids[0].tolist()
    ref = hf_generate(hf_model, ids, extra)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config["eos_token_id"])
    assert len(ours.token_ids) >= NEW_TOKENS or ours.finish_reason == "eos"


def test_greedy_without_repetition_penalty(pipeline, hf_model, hf_inputs, photos):
    ids, extra = hf_inputs("Tell me about the cup.", [photos["coffee"]])
    ours = pipeline.generate("Tell me about the cup.", images=[photos["coffee"]], max_new_tokens=NEW_TOKENS,
                             do_sample=False, repetition_penalty=1.0)
    ref = hf_generate(hf_model, ids, extra, repetition_penalty=1.0)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config["eos_token_id"])


def test_batch_of_two_prompts_of_different_lengths(pipeline, hf_model, hf_inputs, photos):
    """Left-padded batch: each row equals transformers' batched generate (and its own single run)."""
    prompts = ["Describe this image.", "A much longer question about the second picture, asked in many words?"]
    images = [[photos["astronaut"]], [photos["coffee"]]]
    ours = pipeline.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, do_sample=False)
    built = [hf_inputs(p, imgs) for p, imgs in zip(prompts, images)]
    width = max(ids.shape[1] for ids, _ in built)
    pad = pipeline.config["pad_token_id"]
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, (row, _) in enumerate(built):
        ids[b, width - row.shape[1]:] = row[0]
        mask[b, width - row.shape[1]:] = 1
    extra = {"pixel_values": torch.cat([e["pixel_values"] for _, e in built]),
             "image_grid_thw": torch.cat([e["image_grid_thw"] for _, e in built])}
    ref = hf_generate(hf_model, ids, extra, attention_mask=mask)
    for b in range(2):
        assert ours[b].token_ids == strip_after_eos(ref[b].tolist(), pipeline.config["eos_token_id"])
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
    assert t["vision_s"] > 0 and t["prefill_s"] > 0 and t["preprocess_s"] > 0
    assert len(t["decode_s_per_token"]) == len(r.token_ids) - 1


class _CharTokenizer:
    """Token i decodes to chr(i): enough to drive StreamDecoder without a real vocabulary."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stream_decoder_never_prints_part_of_a_stop_string():
    from edgevl.runtime.prompt import StreamDecoder
    stream = StreamDecoder(_CharTokenizer(), stop=("END",))
    printed = "".join(stream.push(ord(c)) for c in "hello ENaEND more")
    assert stream.stopped
    assert printed + stream.finish() == "hello ENa"
    assert stream.text == "hello ENa"
    held = StreamDecoder(_CharTokenizer(), stop=("END",))
    assert "".join(held.push(ord(c)) for c in "abcEN") == "abc"   # "EN" could start "END": held back
    assert held.finish() == "EN" and held.text == "abcEN"
