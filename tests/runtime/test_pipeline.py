"""The pipeline (runtime/pipeline.py) on the tiny model: seeded sampling is reproducible, stop strings cut the text
and the stream alike, every stage's time is reported, and a setting it does not have is refused by name."""

from __future__ import annotations


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


def test_an_unknown_generation_setting_is_one_sentence_naming_it(pipeline):
    import pytest

    from edgevl.errors import EdgevlError
    with pytest.raises(EdgevlError, match=r"^ignore_eos: not a generation setting; they are max_new_tokens, stop, "
                                          r"output and do_sample, temperature, top_k, top_p, repetition_penalty, seed"):
        pipeline.generate("Hi", max_new_tokens=2, ignore_eos=True)
