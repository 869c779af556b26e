"""GPU backends against transformers and the CPU runtime (`pytest -m gpu`; skipped without a GPU).

Needs an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider). On the test machine
benchmarks/gpu_check.sh sets that up. With EDGEVL_GPU_TINY=DIR (holding model/, fp32/ and fp16/,
written by `benchmarks/gpu_prepare.py tiny DIR`) the tiny model and its exports are taken from DIR
instead of being built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import probe
from tests.hf_reference import strip_after_eos

ORT_CUDA_OK, ORT_CUDA_REASON = backends.BACKENDS["ort-cuda"].available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ORT_CUDA_OK, reason=f"ort-cuda: {ORT_CUDA_REASON}")]

PROMPT = "Describe this image in detail."
PREBUILT = Path(os.environ["EDGEVL_GPU_TINY"]) if os.environ.get("EDGEVL_GPU_TINY") else None


# Session-scoped overrides of conftest's fixtures, so conftest's hf_model / pipeline follow them.
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    if PREBUILT:
        return PREBUILT / "model"
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    if PREBUILT:
        return PREBUILT / "fp32"
    from edgevl.export.exporter import export_model
    return export_model(str(tiny_model_dir), tmp_path_factory.mktemp("export") / "fp32", dtype="fp32",
                        log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_artifact_fp16(tiny_model_dir, tmp_path_factory) -> Path:
    if PREBUILT:
        return PREBUILT / "fp16"
    from edgevl.export.exporter import export_model
    return export_model(str(tiny_model_dir), tmp_path_factory.mktemp("export16") / "fp16", dtype="fp16",
                        log=lambda msg: None)


@pytest.fixture(scope="module")
def cuda_pipeline(tiny_artifact_fp16):
    """ort-cuda runs fp16 artifacts: onnxruntime's CUDA GroupQueryAttention has no float32 kernel, and ort-cuda
    refuses an fp32 decoder rather than run its attention on the CPU (runtime/backends/ort_placement.py)."""
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(tiny_artifact_fp16, backend="ort-cuda")


@pytest.fixture(scope="module")
def cpu_pipeline(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(tiny_artifact, backend="ort-cpu")   # the default would be ort-cuda here


def prefill_logits(pipe, image) -> np.ndarray:
    """Vision + prefill of PROMPT with one image: last-position logits [1, vocab] as float64."""
    from edgevl.runtime.generate import Prompt, prefill
    from edgevl.runtime.backends.tensors import to_host
    row = pipe.prepare(PROMPT, [image])
    ids = row.input_ids[None]
    positions, deltas = pipe.positions(ids, np.ones_like(ids), row.grids)
    embeds = pipe.embed(row.input_ids, *pipe.encode_vision(row))
    outputs = prefill(pipe.decoder, pipe.new_cache(1), Prompt(embeds[None], ids, positions, deltas,
                                                               np.array([ids.shape[1]])))
    return to_host(outputs["logits"]).astype(np.float64)


FP16_MARGIN = 0.1     # a top-2 logit gap fp16 (~0.01 off on this model's logits) may flip


def hf_steps(hf_model, ids, extra, new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and, per step, the gap between its two best logits."""
    import torch
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                mm_token_type_ids=(ids == hf_model.config.image_token_id).int(),
                                max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, **extra)
    gaps = [float(np.diff(np.sort(s[0].float().numpy())[-2:])[0]) for s in out.scores]
    return out.sequences[0, ids.shape[1]:].tolist(), gaps


# ----------------------------------------------------------------------------- fp16 on CUDA vs transformers fp32
@pytest.mark.parametrize("names", [["astronaut"], [], ["astronaut", "coffee"]], ids=["image", "text", "two_images"])
def test_ort_cuda_fp16_greedy_tokens_follow_transformers(names, cuda_pipeline, hf_model, hf_inputs, photos):
    """Equal to transformers' fp32 tokens up to EOS, or up to a step whose two best logits are closer than fp16
    can tell apart (random weights have such near-ties; there the paths may part)."""
    paths = [photos[n] for n in names]
    ids, extra = hf_inputs(PROMPT, paths)
    ours = cuda_pipeline.generate(PROMPT, images=paths, max_new_tokens=24, do_sample=False)
    assert ours.prompt_token_ids == ids[0].tolist()
    ref, gaps = hf_steps(hf_model, ids, extra, 24)
    ref = strip_after_eos(ref, cuda_pipeline.config.eos_token_id)
    same = next((i for i, (a, b) in enumerate(zip(ours.token_ids, ref)) if a != b), min(len(ours.token_ids), len(ref)))
    if same < len(ref):
        assert gaps[same] < FP16_MARGIN, f"tokens part at step {same} where transformers' top-2 gap is {gaps[same]}"


def test_ort_cuda_refuses_an_fp32_decoder(tiny_artifact):
    from edgevl.errors import EdgevlError
    from edgevl.runtime.pipeline import Pipeline
    with pytest.raises(EdgevlError, match="GroupQueryAttention on float"):
        Pipeline.load(tiny_artifact, backend="ort-cuda")


def test_kv_cache_stays_on_the_gpu(cuda_pipeline):
    """The in-place cache: buffers allocated (zeroed) on the GPU once, bound as past and present, written there."""
    from edgevl.runtime.generate import decoder_step
    from edgevl.runtime.backends.tensors import to_host
    cfg = cuda_pipeline.config
    cache = cuda_pipeline.new_cache(1)
    addresses = {k: v.data_ptr() for k, v in cache.buffers.items()}
    for buffer in cache.buffers.values():
        assert buffer.array is None and buffer.ortvalue.device_name().lower() == "cuda"
        assert not buffer.numpy().any()
    embeds = np.zeros((1, 5, cfg.hidden_size), np.float32)
    first = decoder_step(cuda_pipeline.decoder, cache, embeds, np.tile(np.arange(5), (3, 1, 1)), np.array([5]))
    assert to_host(first["logits"]).shape == (1, cfg.vocab_size)
    step = decoder_step(cuda_pipeline.decoder, cache, embeds[:, :1], np.full((3, 1, 1), 5), np.array([1]))
    assert cache.length == 6 and np.isfinite(to_host(step["logits"])).all()
    assert {k: v.data_ptr() for k, v in cache.buffers.items()} == addresses


def test_cuda_graph_decode_gives_the_same_tokens(tiny_artifact_fp16, cuda_pipeline, photos):
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    graphed = Pipeline.load(tiny_artifact_fp16, backend="ort-cuda", options=BackendOptions(cuda_graph=True))
    kwargs = dict(images=[photos["astronaut"]], max_new_tokens=16, do_sample=False)
    assert graphed.generate(PROMPT, **kwargs).token_ids == cuda_pipeline.generate(PROMPT, **kwargs).token_ids


def test_ort_cuda_fp32_vision_matches_ort_cpu(tiny_artifact):
    """The fp32 vision graph (MultiHeadAttention has fp32 CUDA kernels) on CUDA vs the CPU EP, TF32 off: 1e-4."""
    from edgevl.artifact import load_artifact, names
    from edgevl.runtime.backends.table import get_backend
    from edgevl.runtime.inputs.rope_index import vision_rotary_position_ids
    graph = load_artifact(tiny_artifact).graph(names.VISION)
    (cuda,) = get_backend("ort-cuda").load([graph])
    (cpu,) = get_backend("ort-cpu").load([graph])
    feed = {names.PIXEL_VALUES: np.random.default_rng(0).standard_normal((64, 1176)).astype(np.float32),
            names.ROTARY_POS_IDS: vision_rotary_position_ids((1, 8, 8), 2)}
    ours, ref = cuda.infer(feed)[names.IMAGE_EMBEDS], cpu.infer(feed)[names.IMAGE_EMBEDS]
    assert float(np.abs(np.asarray(ours, np.float64) - ref).max()) <= 1e-4


# ----------------------------------------------------------------------------- fp16: close
def test_fp16_export_logits_close_to_fp32(tiny_artifact_fp16, cpu_pipeline, photos):
    from edgevl.runtime.pipeline import Pipeline
    pipe16 = Pipeline.load(tiny_artifact_fp16, backend="ort-cuda")
    assert pipe16.dtype == np.float16
    ours, ref = prefill_logits(pipe16, photos["astronaut"]), prefill_logits(cpu_pipeline, photos["astronaut"])
    err = float(np.abs(ours - ref).max())
    # fp16 vs fp32 on the CPU differs by ~0.008 on logits of magnitude ~6 for this model.
    assert err <= 0.05 + 0.01 * float(np.abs(ref).max()), err
    top2 = np.sort(ref[0])[-2:]
    if top2[1] - top2[0] > 2 * err:
        assert ours.argmax() == ref.argmax()
    tokens = pipe16.generate(PROMPT, images=[photos["astronaut"]], max_new_tokens=8, do_sample=False).token_ids
    assert len(tokens) >= 1


# ----------------------------------------------------------------------------- plumbing
def test_doctor_sees_the_gpu():
    from edgevl.runtime.backends.doctor import collect, format_report
    report = collect()
    assert report["gpus"] and report["backends"]["ort-cuda"]["ok"]
    assert report["gpus"][0]["name"] in format_report(report)


@pytest.mark.skipif(probe.cuda_python_module() is None, reason="cuda-python is not installed")
def test_cuda_memory_roundtrip():
    """The TensorRT runner's CUDA layer (cuda-python) without TensorRT: alloc, copies, stream."""
    from edgevl.runtime.backends.trt import CudaMemory
    mem = CudaMemory(0)
    stream = mem.stream()
    assert isinstance(mem.handle(stream), int)
    src = np.arange(1000, dtype=np.float16).reshape(10, 100)
    ptr = mem.alloc(src.nbytes)
    mem.h2d(ptr, src, stream)
    out = np.empty_like(src)
    mem.d2h(out, ptr, stream)
    mem.sync(stream)
    assert np.array_equal(out, src)
    mem.free(ptr)
    mem.destroy(stream)
