"""TensorRT optimization profiles (runtime/backends/sizing.py): every profile's min, opt and max is a shape the graphs run.

TensorRT checks all three corners of every profile against the network when it builds an engine, so a corner the
graph cannot run (the old prefill profile's max: past c-1 + sequence c != total c) fails the build on the GPU. Here
each corner runs through the exported `standard` graphs on onnxruntime's CPU EP, and the arithmetic is checked for
many limits. Also the profiles built from the manifest (and the strings ort-trt takes), the buffer sizes that cover
the largest shapes, and the KV-cache and weight memory arithmetic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest

from edgevl.artifact import names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import sizing
from edgevl.runtime.backends import table as backends


SMALL = sizing.Limits(max_batch=2, max_context=24, max_image_patches=30)


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


QWEN2_VL_2B = {"num_hidden_layers": 28, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 32768}


# ----------------------------------------------------------------------------- profiles and sizes
def test_decoder_profiles_from_the_manifest(art):
    limits = sizing.Limits(max_batch=2, max_context=256)
    decode, prefill, extend = sizing.build_profiles("decoder", art.manifest.graph("decoder").inputs, limits, art.config)
    hidden, kv, hd = art.config.hidden_size, art.config.num_key_value_heads, art.config.head_dim
    assert (decode.name, prefill.name, extend.name) == ("decode", "prefill", "extend")
    assert decode.shapes["inputs_embeds"] == ((1, 1, hidden), (1, 1, hidden), (2, 1, hidden))
    assert decode.shapes["past_key_values.1.value"] == ((1, kv, 1, hd), (1, kv, 128, hd), (2, kv, 255, hd))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 129), (2, 256))
    assert prefill.shapes["position_ids"] == ((3, 1, 1), (3, 1, 256), (3, 2, 256))
    assert prefill.shapes["past_key_values.0.key"][2] == (2, kv, 0, hd)       # prefill starts from an empty cache
    assert extend.shapes["attention_mask"] == ((1, 3), (1, 192), (2, 256))    # 64 new tokens after 128 cached
    assert len(decode.shapes) == 3 + 4 * art.config.num_hidden_layers // 2
    # a decode step, a prompt, and a prompt too long for the engines
    step = {"inputs_embeds": (1, 1, hidden), "attention_mask": (1, 41), "past_key_values.0.key": (1, kv, 40, hd)}
    prompt = {"inputs_embeds": (1, 40, hidden), "attention_mask": (1, 40), "past_key_values.0.key": (1, kv, 0, hd)}
    assert sizing.select_profile([decode, prefill, extend], step) == 0
    assert sizing.select_profile([decode, prefill, extend], prompt) == 1
    with pytest.raises(EdgevlError, match=r"attention_mask has shape \[1, 300\].*--max-context"):
        sizing.select_profile([decode, prefill, extend], {**prompt, "attention_mask": (1, 300)})


def test_vision_profile_and_ort_trt_strings(art):
    (image,) = sizing.build_profiles("vision", art.manifest.graph("vision").inputs,
                                     sizing.Limits(max_image_patches=2048), art.config)
    assert image.shapes == {"pixel_values": ((4, 1176), (1024, 1176), (2048, 1176)),
                            "rotary_pos_ids": ((4, 2), (1024, 2), (2048, 2))}
    opts = sizing.ort_trt_profile_options([image])
    assert opts == {"trt_profile_min_shapes": "pixel_values:4x1176,rotary_pos_ids:4x2",
                    "trt_profile_opt_shapes": "pixel_values:1024x1176,rotary_pos_ids:1024x2",
                    "trt_profile_max_shapes": "pixel_values:2048x1176,rotary_pos_ids:2048x2"}
    provider = backends.ort_trt_provider_options(art.graph("decoder"), backends.BackendOptions(max_context=64))
    assert provider["trt_fp16_enable"] is False and provider["trt_int8_enable"] is False
    assert provider["trt_profile_max_shapes"].count("inputs_embeds:") == 3              # decode, prefill, extend
    assert "past_key_values.0.key:1x2x0x16" in provider["trt_profile_min_shapes"]


def test_buffer_sizes_cover_the_largest_shapes(art):
    limits = sizing.Limits(max_batch=2, max_context=256, max_image_patches=400)
    env = sizing.max_dims("decoder", limits, art.config)
    assert env == {"batch": 2, "sequence": 256, "past_sequence": 255, "total_sequence": 256}
    out = {v.name: v for v in art.manifest.graph("decoder").outputs}
    kv, hd = art.config.num_key_value_heads, art.config.head_dim
    assert sizing.max_tensor_bytes(out["present.0.key"], env) == 2 * kv * 256 * hd * 4
    assert sizing.max_tensor_bytes(out["logits"], env) == 2 * art.config.vocab_size * 4
    (embeds,) = art.manifest.graph("vision").outputs
    assert sizing.eval_dim(embeds.shape[0], {"num_patches": 400}) == 100             # "(num_patches//4)"
    with pytest.raises(EdgevlError):
        sizing.eval_dim("__import__('os')", {})


def test_kv_cache_and_weight_memory(art):
    qwen2_vl_2b = dataclasses.replace(art.config, **QWEN2_VL_2B)
    assert qwen2_vl_2b.kv_cache_bytes(1, 32768, 2) == 2 * 28 * 2 * 32768 * 128 * 2 == 939_524_096
    assert qwen2_vl_2b.kv_cache_bytes(4, 4096, 4) == 2 * 28 * 4 * 2 * 4096 * 128 * 4
    weights = sizing.weights_bytes(art)
    assert weights["decoder"] == (art.path / "decoder.onnx").stat().st_size
    vocab, hidden = art.manifest.embeddings.shape
    assert weights["embeddings"] == vocab * hidden * 4
    plan = sizing.memory_plan(art, 1, 1024)
    assert plan["kv_cache"] == art.config.kv_cache_bytes(1, 1024, 4)
    assert plan["device_total"] == weights["vision"] + weights["decoder"] + 2 * plan["kv_cache"]
