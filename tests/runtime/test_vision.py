"""runtime/vision.py: VisionEncoder.feed builds exactly the inputs each family's vision graph takes, and `call` is
that feed run (the tools that time the graph alone, benchmarks/profile_ort.py, use the same feed)."""

from __future__ import annotations

import numpy as np

from edgevl.runtime.pipeline import Pipeline


def _one_image(pipe: Pipeline, photo):
    prepared = pipe.prepare("Describe this image.", [photo])
    grid, = prepared.grids
    return prepared.pixel_values[0], grid


def _check(pipe: Pipeline, photo) -> None:
    encoder = pipe.vision_encoder
    pixels, grid = _one_image(pipe, photo)
    feed, layout = encoder.feed(pixels, grid)
    assert set(feed) == set(encoder.runner.input_metadata())
    assert layout is None                        # windows are Qwen2.5-VL's only
    direct = encoder.runner.infer(feed)
    features = encoder.call(pixels, grid)
    np.testing.assert_array_equal(features.embeds, direct["image_embeds"])
    if "deepstack_embeds" in direct:
        np.testing.assert_array_equal(features.deepstack, direct["deepstack_embeds"])
    else:
        assert features.deepstack is None


def test_qwen2_vl_feed(any_pipeline, photos):
    _check(any_pipeline, photos["chelsea_odd"])


def test_qwen3_vl_feed_has_the_position_table_taps(qwen3_artifact, photos):
    pipe = Pipeline.load(qwen3_artifact)
    assert {"pos_embed_ids", "pos_embed_weights"} <= set(pipe.vision_encoder.runner.input_metadata())
    _check(pipe, photos["chelsea_odd"])
