"""Backends on a CPU-only machine: selection, clear errors, profiles, cache keys, memory arithmetic,
`edgevl doctor`, and the GPU runners' logic driven on the CPU (IO binding on the CPU EP, the TensorRT
runner over a stand-in engine and host memory)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgevl.artifact.folder import Artifact, GraphFile, load_artifact
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import probe, sizing, trt
from edgevl.runtime.backends.tensors import DeviceTensor
from edgevl.runtime.backends.ort import OnnxrtRunner, OrtIoBindingRunner
from edgevl.runtime.backends.ort_session import SessionFromOnnx
from edgevl.runtime.compare import compare_outputs
from tests.fake_trt import fake_trt_runners

HAS_GPU = bool(probe.gpus())
QWEN2_VL_2B = {"num_hidden_layers": 28, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 32768}


@pytest.fixture
def only(monkeypatch):
    """only('ort-cuda', 'ort-cpu'): pretend exactly these backends are available."""
    def set_available(*names):
        for name, spec in backends.BACKENDS.items():
            verdict = (True, "") if name in names else (False, f"{name} needs something missing")
            monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(spec, available=lambda v=verdict: v))
    return set_available


@pytest.fixture(scope="module")
def art(tiny_artifact_standard):
    """The standard-op artifact: the graphs the TensorRT backends run."""
    return load_artifact(tiny_artifact_standard, verify=False)


# ----------------------------------------------------------------------------- selection and errors
def test_default_is_the_fastest_available(only):
    only("ort-cpu")
    assert backends.get_backend().name == "ort-cpu"
    only("ort-cuda", "ort-cpu")
    assert backends.get_backend().name == "ort-cuda"
    only("trt", "ort-trt", "ort-cuda", "ort-cpu")
    assert backends.get_backend().name == "trt"
    only("ort-trt", "ort-cpu")
    assert backends.get_backend(None).name == "ort-trt"


def test_unavailable_backend_is_a_clear_error_not_a_fallback(only):
    only("ort-cpu")
    with pytest.raises(EdgevlError, match="backend ort-cuda is not available here: ort-cuda needs something "
                                          "missing. Available here: ort-cpu."):
        backends.get_backend("ort-cuda")
    with pytest.raises(EdgevlError, match="unknown backend 'cuda'; choose one of trt, ort-trt, ort-cuda, ort-cpu"):
        backends.get_backend("cuda")
    only()
    with pytest.raises(EdgevlError, match="no backend can run here"):
        backends.get_backend()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_real_probes_name_what_is_missing_here():
    ok, reason = backends.available_ort_cuda()
    assert not ok and "libcuda.so.1" in reason
    ok, reason = backends.available_trt()
    assert not ok and "TensorRT" in reason
    assert backends.available_ort_cpu() == (True, "")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_run_with_an_unavailable_backend_exits_with_one_sentence(tiny_artifact):
    proc = subprocess.run([sys.executable, "-m", "edgevl", "run", str(tiny_artifact), "--prompt", "hi",
                           "--backend", "ort-cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "backend ort-cuda is not available here" in proc.stderr and "Traceback" not in proc.stderr


def test_backend_options_are_validated(art):
    with pytest.raises(EdgevlError, match="--max-context must be at least 1"):
        backends.BackendOptions(max_context=0)
    with pytest.raises(EdgevlError, match="above the model's context"):
        sizing.Limits.resolve(dataclasses.replace(art.config, max_position_embeddings=100), max_context=200)


def test_context_limit(only, art):
    only("ort-cpu", "trt")
    assert backends.get_backend("ort-cpu").context_limit(art.config) == art.config.max_position_embeddings
    opts = backends.BackendOptions(max_context=300)
    assert backends.get_backend("ort-cpu", opts).context_limit(art.config) == 300
    assert backends.get_backend("trt").context_limit(art.config) == sizing.DEFAULT_ENGINE_CONTEXT


# ----------------------------------------------------------------------------- engine cache keys
def test_engine_cache_key_is_stable_and_changes_with_every_input():
    base = dict(graph_sha="a" * 64, gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                trt_version="10.3.0", options={"precision": "graph", "profiles": [["decode", [["x", [1]]]]]})
    key = trt.engine_cache_key(**base)
    assert key == trt.engine_cache_key(**dict(base)) and len(key) == 32
    changes = [{"graph_sha": "b" * 64}, {"gpu_name": "Orin"}, {"compute_capability": (8, 7)},
               {"trt_version": "10.4.0"}, {"options": {**base["options"], "precision": "fp16"}},
               {"options": {**base["options"], "profiles": [["decode", [["x", [2]]]]]}}]
    assert len({trt.engine_cache_key(**{**base, **c}) for c in changes} | {key}) == len(changes) + 1


def test_graph_digest_and_build_options_key(art, tmp_path):
    digest = art.graph("decoder").digest
    assert digest == art.graph("decoder").digest != art.graph("vision").digest
    changed = Artifact(art.path, dataclasses.replace(art.manifest, files={**art.manifest.files,
                                                                          "decoder.onnx": "0" * 64}))
    assert changed.graph("decoder").digest != digest
    assert changed.graph("vision").digest == art.graph("vision").digest
    # a graph outside any artifact hashes its own files: the same digest as inside the artifact
    shutil.copy(art.graph_path("vision"), tmp_path / "vision.onnx")
    outside = GraphFile.standalone(tmp_path / "vision.onnx", art.manifest.graph("vision"), art.config)
    assert outside.digest == art.graph("vision").digest
    profiles = sizing.build_profiles("decoder", art.manifest.graph("decoder").inputs,
                                     sizing.Limits(max_context=64), art.config)
    assert trt.BuildOptions().key(profiles) != trt.BuildOptions("fp16").key(profiles)
    with pytest.raises(EdgevlError):
        trt.BuildOptions("int4")
    assert trt.trt_dtype_to_numpy("HALF") == np.float16 and trt.trt_dtype_to_numpy("INT64") == np.int64


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


def test_engine_backends_wiring_without_tensorrt(monkeypatch, art, tmp_path):
    """ort-trt and trt up to the point where TensorRT itself is needed: inlining, options, cache paths."""
    gpu = probe.GpuInfo(0, "NVIDIA Jetson Orin", (8, 7), 8 << 30)
    monkeypatch.setattr(probe, "gpus", lambda: [gpu])
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.3.0")
    opts = backends.BackendOptions(max_context=128, cache_dir=tmp_path)
    runner = backends.make_ort_trt(art.graph("decoder"), opts)                 # session built lazily
    trt_opts = dict(runner.build_session.providers[0][1])
    assert runner.build_session.path.parent.parent == tmp_path / "inlined"         # the MRoPE-free copy
    assert trt_opts["trt_engine_cache_path"].startswith(str(tmp_path / "ort-trt" / "decoder-"))
    assert "attention_mask:1x128" in trt_opts["trt_profile_max_shapes"]
    assert backends.make_ort_trt(art.graph("vision"), opts).build_session.path == art.graph_path("vision")
    cache, profiles, max_bytes = backends.trt_engine_loader(art.graph("decoder"), opts)
    assert cache.path.parent == tmp_path / "trt" and [p.name for p in profiles] == ["decode", "prefill", "extend"]
    assert max_bytes["logits"] == art.config.vocab_size * 4
    other, _, _ = backends.trt_engine_loader(art.graph("decoder"), dataclasses.replace(opts, max_context=256))
    assert other.path != cache.path
    monkeypatch.setattr(probe, "tensorrt_version", lambda: "10.4.0")
    assert backends.trt_engine_loader(art.graph("decoder"), opts)[0].path != cache.path
    with pytest.raises(EdgevlError, match="--device 3: this machine has 1 GPU"):
        backends.trt_engine_loader(art.graph("decoder"), dataclasses.replace(opts, device_id=3))


# ----------------------------------------------------------------------------- doctor and CLI
def _parse(add_parser, argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_doctor_reports_no_gpu_here(capsys, tiny_artifact):
    from edgevl.cli.doctor import add_parser as add_doctor_parser
    args = _parse(add_doctor_parser, ["doctor", str(tiny_artifact), "--max-context", "512"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "GPU           none usable: no NVIDIA driver here" in text
    assert "only the CPU backend will run" in text and "ort-cpu   works" in text
    assert "kv_cache" in text and probe.machine() in text
    args = _parse(add_doctor_parser, ["doctor", "--json"])
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == [] and report["default_backend"] == "ort-cpu"
    assert report["backends"]["ort-cuda"]["ok"] is False


def test_gpu_cli_options_have_help():
    from edgevl.cli.build import add_parser as add_build_parser
    from edgevl.cli.doctor import add_parser as add_doctor_parser
    for add in (add_build_parser, add_doctor_parser):
        parser = argparse.ArgumentParser()
        add(parser.add_subparsers())
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for p in sub.choices.values():
            assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]


def test_build_for_ort_cpu_has_nothing_to_build(tiny_artifact, capsys):
    from edgevl.cli.build import add_parser as add_build_parser
    args = _parse(add_build_parser, ["build", str(tiny_artifact), "--backend", "ort-cpu", "--no-verify"])
    assert args.func(args) == 0
    assert "nothing to build" in capsys.readouterr().err


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


def test_one_shared_thread_pool_gives_the_same_tokens_and_the_cli_uses_it(tiny_artifact, tmp_path):
    """share_thread_pool() (what run/chat/serve/bench call) puts every session on one pool: same greedy tokens as
    per-session pools; `edgevl run` works with it; sessions made afterwards need no pool of their own."""
    script = tmp_path / "pool.py"
    script.write_text(f"""
import sys
from edgevl.runtime.backends import ort_session
from edgevl.runtime.pipeline import Pipeline
def tokens():
    pipe = Pipeline.load({str(tiny_artifact)!r}, verify=False)
    return pipe.generate("Describe the image.", max_new_tokens=8, do_sample=False).token_ids
alone = tokens()
assert ort_session.share_thread_pool(0) and ort_session.share_thread_pool(3)       # the first call sized it
assert not ort_session.session_options(2).use_per_session_threads
print("same" if tokens() == alone else f"different: {{alone}}")
""")
    env = {**os.environ, "EDGEVL_SHARED_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "edgevl", "run", str(tiny_artifact), "--prompt", "hi",
                          "--max-new-tokens", "4", "--threads", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", "from edgevl.runtime.backends import ort_session; "
                          "print(ort_session.share_thread_pool(), ort_session.session_options().use_per_session_threads)"],
                         capture_output=True, text=True, env={**os.environ, "EDGEVL_SHARED_THREADS": "0"}, timeout=120)
    assert off.stdout.split() == ["False", "True"], off.stderr[-2000:]


def _tokens(pipe, photo):
    return pipe.generate("Describe the image.", images=[photo], max_new_tokens=10, do_sample=False).token_ids


def test_io_binding_runner_keeps_the_cache_as_device_values(standard_pipeline, photos):
    """The ort-cuda runner's code path on the CPU EP, concat cache: same tokens, KV cache as DeviceTensors."""
    from edgevl.runtime.generate import decoder_step
    pipe = standard_pipeline
    expected = _tokens(pipe, photos["coffee"])
    io = OrtIoBindingRunner(SessionFromOnnx(pipe.artifact.graph_path("decoder")), device="cpu")
    io.activate()
    with _Swapped(pipe, pipe.vision, io):
        assert _tokens(pipe, photos["coffee"]) == expected
    cache = pipe.new_cache(1)
    embeds = np.zeros((1, 4, pipe.config.hidden_size), np.float32)
    outputs = decoder_step(io, cache, embeds, np.tile(np.arange(4), (3, 1, 1)), np.array([4]))
    assert isinstance(outputs["next_token"], np.ndarray) and cache.length == 4
    assert isinstance(outputs["logits"], DeviceTensor)                 # greedy needs only next_token on the host
    assert all(isinstance(v, DeviceTensor) and v.owner is io for v in cache.arrays.values())
    key = cache.arrays["past_key_values.0.key"]
    assert np.array_equal(key[:, :, :2], np.asarray(key)[:, :, :2]) and key[:, :, :2].shape[2] == 2


def test_the_in_place_cache_is_written_where_it_lies(pipeline, photos):
    """ort-cpu and the ort-cuda code path (on the CPU EP): past and present are the same memory; every step
    writes its rows by position and nothing is copied or reallocated (ort-cpu's one-row decode steps also write
    copies of the new row into the spare positions after it, which the next step overwrites)."""
    from edgevl.runtime.generate import decoder_step
    for decoder in (pipeline.decoder, OrtIoBindingRunner(SessionFromOnnx(pipeline.artifact.graph_path("decoder")),
                                                         device="cpu")):
        decoder.activate()
        cache = pipeline.new_cache(1)
        buffers = dict(cache.buffers)
        addresses = {k: (v.data_ptr(), v.array.ctypes.data) for k, v in buffers.items()}
        assert all(a == b for a, b in addresses.values())             # the OrtValue wraps the numpy memory
        rng = np.random.default_rng(0)
        before = None
        for step, n in enumerate((5, 1, 1)):
            embeds = rng.standard_normal((1, n, pipeline.config.hidden_size)).astype(np.float32)
            start = cache.length
            outputs = decoder_step(decoder, cache, embeds, np.tile(np.arange(start, start + n), (3, 1, 1)),
                                   np.array([n]))
            for name, buffer in cache.buffers.items():
                assert buffer is buffers[name] and buffer.data_ptr() == addresses[name][0]
                assert outputs[name.replace("past_key_values.", "present.")] is buffer
            key = buffers["past_key_values.0.key"].array
            spare = decoder.kv_spare_positions if n == 1 else 0   # ort-cpu's grouped decode steps write copies
            assert np.abs(key[:, :, start:start + n]).sum() > 0 and not key[:, :, start + n + spare:].any()
            assert np.array_equal(key[:, :, start + n:start + n + spare],
                                  np.repeat(key[:, :, start:start + 1], spare, axis=2))
            if before is not None:
                assert np.array_equal(key[:, :, :start], before)      # earlier rows untouched
            before = key[:, :, :start + n].copy()
        assert cache.length == 7
        cache.truncate(3)                                             # a chat cut back: nothing copied
        assert cache.length == 3 and cache.buffers["past_key_values.0.key"] is buffers["past_key_values.0.key"]


class _Swapped:
    """Run a pipeline on other runners for the duration of a with-block."""

    def __init__(self, pipeline, vision, decoder):
        self.pipeline, self.runners = pipeline, (vision, decoder)

    def __enter__(self):
        self.saved = self.pipeline.vision, self.pipeline.decoder
        self.pipeline.vision, self.pipeline.decoder = self.runners

    def __exit__(self, *exc):
        self.pipeline.vision, self.pipeline.decoder = self.saved


def test_trt_runner_logic_over_a_stand_in_engine(standard_pipeline, photos, art):
    """TrtRunner's profiles, buffers and KV ping-pong, with TensorRT and CUDA replaced by stand-ins."""
    expected = _tokens(standard_pipeline, photos["astronaut"])
    runners, memories = fake_trt_runners(art, sizing.Limits(max_context=512, max_image_patches=2048))
    with _Swapped(standard_pipeline, runners["vision"], runners["decoder"]):
        assert _tokens(standard_pipeline, photos["astronaut"]) == expected
    dec = runners["decoder"]
    assert dec.context.profiles_set == [1, 0]              # prefill profile, then decode for every new token
    kv_buffers = {p for out in dec.kv.values() for p in dec.buffers[out]}
    assert not [p for p in memories["decoder"].h2d_calls if p in kv_buffers]   # the cache never left the "GPU"
    for r in runners.values():
        r.deactivate()
    assert not memories["decoder"].blocks                  # every buffer freed


def _chat(pipeline, photo):
    from edgevl.runtime.chat import ChatSession
    chat = ChatSession(pipeline)
    first = chat.send("What is in this image?", images=[photo], max_new_tokens=8, do_sample=False)
    second = chat.send("And what colour is it?", max_new_tokens=8, do_sample=False)
    return first.token_ids, second.token_ids, chat.last_prefill_tokens


def test_chat_reuses_a_device_cache(pipeline, standard_pipeline, photos, art):
    """Multi-turn chat (cache kept, then cut to the common prefix) on the device runners' code paths:
    the in-place cache on the IO-binding runner, the concat cache on it and on the TensorRT runner."""
    expected = _chat(pipeline, photos["coffee"])
    for pipe in (pipeline, standard_pipeline):
        io = OrtIoBindingRunner(SessionFromOnnx(pipe.artifact.graph_path("decoder")), device="cpu")
        io.activate()
        with _Swapped(pipe, pipe.vision, io):
            assert _chat(pipe, photos["coffee"]) == expected
    runners, _ = fake_trt_runners(art, sizing.Limits(max_context=1024, max_image_patches=2048))
    with _Swapped(standard_pipeline, runners["vision"], runners["decoder"]):
        assert _chat(standard_pipeline, photos["coffee"]) == expected


# ----------------------------------------------------------------------------- M-RoPE inlining
def test_inlined_decoder_has_no_functions_and_same_outputs(art, tmp_path):
    import onnx
    path = trt.inline_local_functions(art.graph_path("decoder"), tmp_path / "inlined", log=lambda m: None)
    model = onnx.load(str(path))
    assert not model.functions and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert "edgevl" not in {i.domain for i in model.opset_import}
    assert trt.inline_local_functions(art.graph_path("decoder"), tmp_path / "inlined") == path   # reused
    a = OnnxrtRunner(SessionFromOnnx(art.graph_path("decoder")))
    b = OnnxrtRunner(SessionFromOnnx(path))
    a.activate(), b.activate()
    rng = np.random.default_rng(1)
    kv, hd = art.config.num_key_value_heads, art.config.head_dim
    feed = {"inputs_embeds": rng.standard_normal((2, 3, art.config.hidden_size), np.float32),
            "position_ids": rng.integers(0, 50, (3, 2, 3)), "attention_mask": np.ones((2, 7), np.int64),
            **{n: rng.standard_normal((2, kv, 4, hd), np.float32) for n in a.input_metadata()
               if n.startswith("past_key_values.")}}
    assert compare_outputs(a.infer(feed), b.infer(feed), atol=1e-5)["ok"]


def test_backend_modules_import_without_heavy_packages():
    """aarch64-safe imports: no torch, transformers, onnx, tensorrt or cuda-python needed to load or probe."""
    script = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'onnx', 'tensorrt', 'cuda', 'cuda.bindings'):\n"
        "    sys.modules[m] = None\n"
        "from edgevl.runtime.backends import table, doctor, trt, sizing, probe\n"
        "import edgevl.cli\n"
        "report = doctor.collect()\n"
        "assert report['backends']['ort-cpu']['ok'], report\n"
        "assert not report['backends']['trt']['ok'] and not report['backends']['ort-trt']['ok']\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_fast_load_skips_prepacking_with_the_same_tokens(tiny_artifact, pipeline, photos):
    from edgevl.runtime.backends.table import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    fast = Pipeline.load(tiny_artifact, backend="ort-cpu", options=BackendOptions(prepack=False))
    entries = fast.decoder.session.get_session_options().get_session_config_entry("session.disable_prepacking")
    assert entries == "1"
    kwargs = dict(images=[photos["coffee"]], max_new_tokens=8, do_sample=False)
    assert fast.generate("Describe.", **kwargs).token_ids == pipeline.generate("Describe.", **kwargs).token_ids


def test_fast_load_still_prepacks_quantized_graphs(tiny_artifact, tmp_path):
    # quantized kernels are many times slower on unpacked weights: --fast-load leaves them packed
    import shutil

    from edgevl.runtime.backends.table import BackendOptions
    art = load_artifact(tiny_artifact, verify=False)
    decoder = art.graph("decoder")
    quantized = dataclasses.replace(decoder, spec=dataclasses.replace(decoder.spec, precision="int4"))
    backend = backends.get_backend("ort-cpu", BackendOptions(prepack=False))
    assert backend.make_runner(quantized).build_session.prepack
    assert not backend.make_runner(art.graph("vision")).build_session.prepack
    outside = tmp_path / "vision.onnx"                  # a graph outside an artifact: its GraphSpec decides
    shutil.copy(art.graph_path("vision"), outside)
    loose = GraphFile.standalone(outside, dataclasses.replace(art.manifest.graph("vision"), precision="int8"),
                                 art.config)
    assert backend.make_runner(loose).build_session.prepack


class _Gate:
    """A stand-in runner whose activate() waits at a barrier: it only gets through when the other
    runner is activating at the same moment (no timing assumptions: a sequential load breaks the barrier)."""

    def __init__(self, barrier, fail=False):
        self.barrier, self.fail, self.active = barrier, fail, False

    def activate(self):
        self.barrier.wait()
        if self.fail:
            raise EdgevlError("cannot load this graph")
        self.active = True

    def deactivate(self):
        self.active = False


def test_graphs_load_at_the_same_time():
    import threading

    from edgevl.runtime.backends.runner import activate_all
    barrier = threading.Barrier(2, timeout=10)
    gates = [_Gate(barrier), _Gate(barrier)]
    activate_all(gates)
    assert all(g.active for g in gates)


def test_sequential_load_and_a_failed_graph_leave_nothing_loaded():
    import threading

    from edgevl.runtime.backends.runner import activate_all
    barrier = threading.Barrier(1)             # passes at once: nothing waits for a partner
    plain = [_Gate(barrier), _Gate(barrier)]
    activate_all(plain, concurrently=False)
    assert all(g.active for g in plain)
    pair = threading.Barrier(2, timeout=10)
    gates = [_Gate(pair), _Gate(pair, fail=True)]
    with pytest.raises(EdgevlError, match="cannot load"):
        activate_all(gates)
    assert not any(g.active for g in gates)    # the one that loaded was released again


def test_engine_backends_load_one_graph_at_a_time():
    # building two TensorRT engines at once doubles the builder's GPU memory
    assert not backends.BACKENDS["trt"].concurrent_load and not backends.BACKENDS["ort-trt"].concurrent_load
    assert backends.BACKENDS["ort-cpu"].concurrent_load and backends.BACKENDS["ort-cuda"].concurrent_load


def test_static_decode_steps_reuse_every_address_and_bring_back_only_tokens(pipeline, photos):
    """The ort-cuda --cuda-graph loop on the CPU EP: decode-step inputs copied into buffers allocated once,
    logits and next_token written to fixed buffers, total_sequence_length fixed at max_context; same tokens."""
    expected = _tokens(pipeline, photos["coffee"])
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
    with _Swapped(pipeline, pipeline.vision, static):
        assert _tokens(pipeline, photos["coffee"]) == expected
    assert len(seen) == len(expected) - 1                         # every decode step took the static path
    assert all(step[:2] == seen[0][:2] for step in seen)          # ... at the very same addresses
    assert {"logits", "next_token"} <= set(seen[0][1]) and {"inputs_embeds", "position_ids"} <= set(seen[0][0])
    assert {step[2] for step in seen} == {pipeline.max_context}
