"""The pipeline (runtime/pipeline.py) on the tiny model: seeded sampling is reproducible, stop strings cut the text
and the stream alike, and every stage's time is reported."""

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
