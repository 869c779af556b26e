"""Shared fixtures: one tiny random Qwen2-VL folder, its fp32 export, and transformers' view of it.

Everything is built once per session in a temp folder (tens of seconds on 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `edgevl run/chat/serve/bench` put the whole process on one onnxruntime thread pool, for good; onnxruntime then
# refuses the per-session pools its quantizers make. The suite calls those commands in its own process, so
# it opts out here; tests/runtime/backends/test_ort_session.py checks the shared pool in
# subprocesses.
os.environ["EDGEVL_SHARED_THREADS"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _edgevl_cache(tmp_path_factory):
    """What the runtime keeps between loads (the int8 prefill's copies, engines) goes to a folder of this session,
    never to the user's ~/.cache/edgevl; tests that need their own set EDGEVL_CACHE themselves."""
    before = os.environ.get("EDGEVL_CACHE")
    os.environ["EDGEVL_CACHE"] = str(tmp_path_factory.mktemp("edgevl-cache"))
    yield Path(os.environ["EDGEVL_CACHE"])
    if before is None:
        os.environ.pop("EDGEVL_CACHE", None)
    else:
        os.environ["EDGEVL_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    from edgevl.export.exporter import export_model
    out = tmp_path_factory.mktemp("export") / "tiny-fp32"
    return export_model(str(tiny_model_dir), out, dtype="fp32", log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_artifact_standard(tiny_model_dir, tmp_path_factory) -> Path:
    """The same model exported with ONNX-standard ops only (the graphs TensorRT runs)."""
    from edgevl.export.exporter import export_model
    out = tmp_path_factory.mktemp("export") / "tiny-fp32-standard"
    return export_model(str(tiny_model_dir), out, dtype="fp32", variant="standard", log=lambda msg: None)


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL in the hub's layout (DeepStack, learned position table, interleaved M-RoPE)."""
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("qwen3") / "model", preset="qwen3-vl-tiny", seed=1)


@pytest.fixture(scope="session", params=["ort", "standard"])
def qwen3_artifact(request, qwen3_model_dir, tmp_path_factory) -> Path:
    """That model exported in each graph variant."""
    from edgevl.export.exporter import export_model
    return export_model(str(qwen3_model_dir), tmp_path_factory.mktemp("qwen3-export") / request.param,
                        variant=request.param, log=lambda msg: None)


@pytest.fixture(scope="session")
def qwen3_hf(qwen3_model_dir):
    from transformers import Qwen3VLForConditionalGeneration
    return Qwen3VLForConditionalGeneration.from_pretrained(qwen3_model_dir, dtype="float32").eval()


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="session")
def hf_inputs(tiny_model_dir):
    from tests.hf_reference import make_hf_inputs
    return make_hf_inputs(tiny_model_dir)


@pytest.fixture(scope="session")
def pipeline(tiny_artifact):
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(tiny_artifact)


@pytest.fixture(scope="session")
def standard_pipeline(tiny_artifact_standard):
    """The standard-op graphs on onnxruntime's CPU EP (concat KV cache, left padding)."""
    from edgevl.runtime.pipeline import Pipeline
    return Pipeline.load(tiny_artifact_standard, backend="ort-cpu")


@pytest.fixture(scope="session", params=["ort", "standard"])
def any_pipeline(request, pipeline, standard_pipeline):
    """Each graph variant, for the parity tests both must pass."""
    return pipeline if request.param == "ort" else standard_pipeline


def _photo(name: str) -> Image.Image:
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs (scikit-image samples) saved as files, incl. odd sizes, grayscale and RGBA."""
    folder = tmp_path_factory.mktemp("photos")
    images = {
        "astronaut": _photo("astronaut"),                                   # 512x512 RGB
        "coffee": _photo("coffee"),                                         # 600x400 RGB
        "chelsea_odd": _photo("chelsea").crop((13, 7, 13 + 333, 7 + 217)),  # odd-sized crop
        "camera_gray": _photo("camera").resize((301, 199)),                 # grayscale (L)
        "rocket_rgba": _photo("rocket").convert("RGBA"),                    # RGBA
    }
    rgba = np.array(images["rocket_rgba"])
    rgba[:, : rgba.shape[1] // 3, 3] = 90                                   # real transparency
    images["rocket_rgba"] = Image.fromarray(rgba)
    paths = {}
    for name, img in images.items():
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    return paths


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> Path:
    """A 2-second lossless video file, 16 frames of 84x112 at 8 fps (sampled at 2 fps: 4 frames, t=2)."""
    pytest.importorskip("av")
    from tests.data.video_frames import synthetic_frames, write_video
    path = tmp_path_factory.mktemp("video") / "clip.mov"
    write_video(path, synthetic_frames(16, 84, 112), fps=8)
    return path
