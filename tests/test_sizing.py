"""TensorRT optimization profiles (runtime/backends/sizing.py): every profile's min, opt and max is a shape the graphs run.

TensorRT checks all three corners of every profile against the network when it builds an engine, so a corner the
graph cannot run (the old prefill profile's max: past c-1 + sequence c != total c) fails the build on the GPU. Here
each corner runs through the exported `standard` graphs on onnxruntime's CPU EP, and the arithmetic is checked for
many limits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest

from edgevl.artifact import load_artifact, names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import sizing

SMALL = sizing.Limits(max_batch=2, max_context=24, max_image_patches=30)


@pytest.fixture(scope="module")
def art(tiny_artifact_standard):
    return load_artifact(tiny_artifact_standard)


@pytest.mark.parametrize("context", [2, 3, 7, 8, 9, 64, 4096, 32768])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_decoder_corner_is_consistent(art, context, batch):
    config = dataclasses.replace(art.config, max_position_embeddings=32768)
    for name, dims in sizing.dim_ranges(names.DECODER, sizing.Limits(batch, context), config):
        for i in range(3):
            past, seq, total = (dims[d][i] for d in (names.PAST_SEQUENCE, names.SEQUENCE, names.TOTAL_SEQUENCE))
            assert past + seq == total <= context and past >= 0 and seq >= 1, (name, i, past, seq, total)
        for lo, opt, hi in dims.values():
            assert 0 <= lo <= opt <= hi, (name, dims)


@pytest.mark.parametrize("patches", [4, 5, 30, 1024, 4097])
def test_vision_corners_are_whole_merged_tokens(art, patches):
    config = art.config
    (_, dims), = sizing.dim_ranges(names.VISION, sizing.Limits(max_image_patches=patches), config)
    unit = config.spatial_merge_size ** 2
    assert all(n % unit == 0 and n >= unit for n in dims[names.NUM_PATCHES])
    assert dims[names.NUM_PATCHES][2] <= max(patches, unit)


def _feed_decoder(spec, env: dict, kv: int, hd: int, hidden: int) -> dict:
    b, s, p, t = (env[d] for d in (names.BATCH, names.SEQUENCE, names.PAST_SEQUENCE, names.TOTAL_SEQUENCE))
    rng = np.random.default_rng(0)
    feed = {names.INPUTS_EMBEDS: rng.standard_normal((b, s, hidden), np.float32),
            names.POSITION_IDS: np.broadcast_to(np.arange(p, t), (3, b, s)).astype(np.int64).copy(),
            names.ATTENTION_MASK: np.ones((b, t), np.int64)}
    for value in spec.inputs:
        if names.is_past(value.name):
            feed[value.name] = rng.standard_normal((b, kv, p, hd), np.float32)
    return feed


def _feed_vision(env: dict, config) -> dict:
    n = env[names.NUM_PATCHES]
    side = config.spatial_merge_size
    rows = n // side                                   # an image of side x (n / side) patches
    ids = np.stack(np.meshgrid(np.arange(side), np.arange(rows), indexing="ij"), -1).reshape(-1, 2)
    return {names.PIXEL_VALUES: np.random.default_rng(0).standard_normal((n, 1176), np.float32),
            names.ROTARY_POS_IDS: ids.astype(np.int64)}


def test_every_profile_corner_runs_through_the_standard_graphs(art):
    """min, opt and max of every profile, as feeds of exactly those shapes, through vision.onnx and decoder.onnx."""
    config = art.config
    for kind in names.GRAPH_KINDS:
        spec = art.manifest.graph(kind, "standard")
        session = ort.InferenceSession(str(art.graph_path(kind, "standard")), providers=["CPUExecutionProvider"])
        profiles = sizing.build_profiles(kind, spec.inputs, SMALL, config)
        assert [p.name for p in profiles] == (["image"] if kind == names.VISION else ["decode", "prefill", "extend"])
        for profile, (_, dims) in zip(profiles, sizing.dim_ranges(kind, SMALL, config)):
            for corner in range(3):
                env = {d: r[corner] for d, r in dims.items()}
                feed = (_feed_vision(env, config) if kind == names.VISION else
                        _feed_decoder(spec, env, config.num_key_value_heads, config.head_dim, config.hidden_size))
                assert {k: v.shape for k, v in feed.items()} == {k: s[corner] for k, s in profile.shapes.items()}
                outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
                for value in spec.outputs:                                   # the manifest's dims, evaluated
                    expected = tuple(sizing.eval_dim(d, {**env}) for d in value.shape)
                    assert outputs[value.name].shape == expected, (profile.name, corner, value.name)
                    assert np.isfinite(outputs[value.name]).all() if outputs[value.name].dtype.kind == "f" else True


def test_each_kind_of_call_finds_its_profile(art):
    spec = art.manifest.graph(names.DECODER, "standard")
    profiles = sizing.build_profiles(names.DECODER, spec.inputs, sizing.Limits(max_context=4096), art.config)
    kv, hd, h = art.config.num_key_value_heads, art.config.head_dim, art.config.hidden_size

    def call(past, new):
        return {names.INPUTS_EMBEDS: (1, new, h), names.ATTENTION_MASK: (1, past + new),
                names.past_name(0, "key"): (1, kv, past, hd)}

    assert [sizing.select_profile(profiles, call(p, s)) for p, s in ((40, 1), (0, 40), (0, 4096), (4095, 1),
                                                                      (300, 60), (3072, 1024))] == [0, 1, 1, 0, 2, 2]
    with pytest.raises(EdgevlError, match=r"no optimization profile of the engines \(decode, prefill, extend\) holds"):
        sizing.select_profile(profiles, call(3500, 100))      # past the extend profile's 3c/4 cached tokens
    with pytest.raises(EdgevlError, match=r"--max-context"):
        sizing.select_profile(profiles, call(0, 5000))
