"""The onnxruntime runners (runtime/backends/ort.py) on the CPU: ort-cpu is the plain session, its vision runner
shrinks the arena only for new image sizes, and the IO-binding runner (ort-cuda's code path, on the CPU EP) keeps the
cache as device values and runs --cuda-graph's static decode steps at fixed addresses, with the same tokens."""

from __future__ import annotations

import numpy as np

from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends.tensors import DeviceTensor
from edgevl.runtime.backends.ort import OnnxrtRunner, OrtIoBindingRunner
from edgevl.runtime.backends.ort_session import SessionFromOnnx
from edgevl.runtime.compare import compare_outputs
from tests.swapped_runners import Swapped, greedy_tokens


# ----------------------------------------------------------------------------- runners on the CPU
def test_ort_cpu_backend_is_the_plain_session(art):
    import onnxruntime as ort
    runner = backends.get_backend("ort-cpu", backends.BackendOptions(threads=1)).make_runner(art.graph("decoder"))
    assert type(runner) is OnnxrtRunner
    runner.activate()
    rng = np.random.default_rng(0)
    kv, hd = art.config.num_key_value_heads, art.config.head_dim
    feed = {"inputs_embeds": rng.standard_normal((1, 3, art.config.hidden_size), np.float32),
            "position_ids": np.tile(np.arange(2, 5), (3, 1, 1)), "attention_mask": np.ones((1, 5), np.int64),
            **{n: rng.standard_normal((1, kv, 2, hd), np.float32) for n in runner.input_metadata()
               if n.startswith("past_key_values.")}}
    plain = ort.InferenceSession(str(art.graph_path("decoder")), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feed)))
    assert compare_outputs(runner.infer(feed), expected, atol=0.0)["ok"]


def test_ort_cpu_vision_shrinks_its_arena_only_when_the_image_size_changes(art, monkeypatch):
    """The vision runner keeps onnxruntime's arena for repeated sizes (malloc per call is slower) and asks for
    arena shrinkage after a call with new shapes, the first included (so a large photo's blocks are not held);
    outputs unchanged."""
    from edgevl.runtime.inputs.rope_index import vision_rotary_position_ids
    runner = backends.get_backend("ort-cpu", backends.BackendOptions(threads=1)).make_runner(art.graph("vision"))
    decoder = backends.get_backend("ort-cpu", backends.BackendOptions(threads=1)).make_runner(art.graph("decoder"))
    assert runner.shrink_on_new_shapes and not decoder.shrink_on_new_shapes
    runner.activate()
    patch_dim = runner.input_metadata()["pixel_values"].shape[1]
    rng = np.random.default_rng(0)

    def feed(h, w):
        return {"pixel_values": rng.standard_normal((h * w, patch_dim)).astype(np.float32),
                "rotary_pos_ids": vision_rotary_position_ids((1, h, w), 2)}

    sent = []
    real_run = runner.session.run
    monkeypatch.setattr(runner.session, "run", lambda names, f, options=None: sent.append(options) or
                        real_run(names, f, options))
    small, large = feed(4, 4), feed(8, 12)
    first = runner.infer(small)
    runner.infer(small)
    again = runner.infer(large)
    runner.infer(large)
    back = runner.infer(small)
    shrunk = [o is not None and o.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
              for o in sent]
    assert shrunk == [True, False, True, False, True]
    assert np.array_equal(first["image_embeds"], back["image_embeds"]) and again["image_embeds"].shape[0] == 24


def test_io_binding_runner_keeps_the_cache_as_device_values(standard_pipeline, photos):
    """The ort-cuda runner's code path on the CPU EP, concat cache: same tokens, KV cache as DeviceTensors."""
    from edgevl.runtime.generate import decoder_step
    pipe = standard_pipeline
    expected = greedy_tokens(pipe, photos["coffee"])
    io = OrtIoBindingRunner(SessionFromOnnx(pipe.artifact.graph_path("decoder")), device="cpu")
    io.activate()
    with Swapped(pipe, pipe.vision, io):
        assert greedy_tokens(pipe, photos["coffee"]) == expected
    cache = pipe.new_cache(1)
    embeds = np.zeros((1, 4, pipe.config.hidden_size), np.float32)
    outputs = decoder_step(io, cache, embeds, np.tile(np.arange(4), (3, 1, 1)), np.array([4]))
    assert isinstance(outputs["next_token"], np.ndarray) and cache.length == 4
    assert isinstance(outputs["logits"], DeviceTensor)                 # greedy needs only next_token on the host
    assert all(isinstance(v, DeviceTensor) and v.owner is io for v in cache.arrays.values())
    key = cache.arrays["past_key_values.0.key"]
    assert np.array_equal(key[:, :, :2], np.asarray(key)[:, :, :2]) and key[:, :, :2].shape[2] == 2


def test_static_decode_steps_reuse_every_address_and_bring_back_only_tokens(pipeline, photos):
    """The ort-cuda --cuda-graph loop on the CPU EP: decode-step inputs copied into buffers allocated once,
    logits and next_token written to fixed buffers, total_sequence_length fixed at max_context; same tokens."""
    expected = greedy_tokens(pipeline, photos["coffee"])
    static = OrtIoBindingRunner(SessionFromOnnx(pipeline.artifact.graph_path("decoder")), device="cpu",
                                static_decode=True)
    static.activate()
    seen = []
    run = static._run_bound

    def spy(feed, bindings, options=None):
        if feed["inputs_embeds"].__class__.__name__ == "OrtBuffer":   # a decode step
            seen.append(({k: v.data_ptr() for k, v in feed.items() if hasattr(v, "data_ptr")},
                         {k: v.data_ptr() for k, v in bindings.items()}, int(feed["total_sequence_length"])))
        return run(feed, bindings, options)

    static._run_bound = spy
    with Swapped(pipeline, pipeline.vision, static):
        assert greedy_tokens(pipeline, photos["coffee"]) == expected
    assert len(seen) == len(expected) - 1                         # every decode step took the static path
    assert all(step[:2] == seen[0][:2] for step in seen)          # ... at the very same addresses
    assert {"logits", "next_token"} <= set(seen[0][1]) and {"inputs_embeds", "position_ids"} <= set(seen[0][0])
    assert {step[2] for step in seen} == {pipeline.max_context}
