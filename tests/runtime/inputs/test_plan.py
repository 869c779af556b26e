"""Every entry point plans a prompt's images and videos from their headers before decoding a pixel (runtime/inputs/plan.py):
refusals are fast and name the numbers, rotated images and odd containers are counted right, long videos are
fitted, and the server keeps answering while a request decodes."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.budget import PromptTooLong
from edgevl.runtime.inputs.image_loading import read_image_header
from tests.data.video_frames import synthetic_frames
from tests.serve_helpers import assert_error_shape, one_sentence, running

TEXT = [{"type": "text", "text": "Describe."}]


def solid_png(size=4096) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoded (an image file's data, a video frame) fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr("edgevl.runtime.inputs.video._read", refuse)


def encode(frames: np.ndarray, path: Path, fmt: str | None = None, codec: str = "mpeg4", fps: int = 8) -> Path:
    """A lossy video (any container PyAV writes), quickly."""
    import av
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ----------------------------------------------------------------------------- images
def test_forty_large_images_are_refused_from_their_headers(pipeline, no_decoding):
    png = solid_png()
    t0 = time.perf_counter()
    with pytest.raises(PromptTooLong) as e:
        pipeline.prepare("Describe.", images=[png] * 40)
    assert time.perf_counter() - t0 < 1.0
    message = str(e.value)
    assert "for 40 images" in message and f"context is {pipeline.max_context} tokens" in message
    assert one_sentence(message)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_exif_rotation_swaps_the_header_size_without_decoding(tmp_path, fmt, monkeypatch):
    path = tmp_path / f"rotated.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 6                                           # turned 90 degrees: 300x200 stored, 200x300 shown
    Image.new("RGB", (300, 200), (10, 120, 30)).save(path, fmt, exif=exif)
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
        header = read_image_header(path)
    from edgevl.runtime.inputs.image_loading import load_image
    assert header.size == (200, 300) == load_image(path).size


def test_planned_tokens_are_the_prompts_length(pipeline, photos, video_file, tmp_path):
    from edgevl.runtime.inputs.video import VideoClip
    clip = VideoClip(synthetic_frames(6, 56, 84), 2.0, 6, np.arange(6))
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(photos["coffee"]).save(tmp_path / "turned.jpg", exif=exif)
    images = [photos["astronaut"], Image.open(photos["rocket_rgba"]), (tmp_path / "turned.jpg").read_bytes()]
    messages = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "video"}] * 2 + TEXT}]
    plan = pipeline.plan_messages(messages, images, [video_file, clip])
    row = pipeline.prepare_plan(plan)
    assert plan.tokens == len(row.input_ids)
    assert [p.grid for p in plan.video_plans if p is not None] == row.video_grids[:1]


# ----------------------------------------------------------------------------- videos
@pytest.mark.parametrize("name, fmt, codec", [("clip.h264", "h264", "libx264"), ("clip.mkv", "matroska", "mpeg4"),
                                              ("clip.ts", "mpegts", "mpeg4")])
def test_a_video_without_a_frame_count_has_its_packets_counted(tmp_path, name, fmt, codec):
    import av

    from edgevl.runtime.inputs.video import probe_video, read_frames
    from edgevl.runtime.inputs.budget import plan_video
    from edgevl.artifact.processors import ImageProcessorSettings
    path = encode(synthetic_frames(30, 84, 112), tmp_path / name, fmt, codec)
    with av.open(str(path)) as container:
        assert not container.streams.video[0].frames                # no count in the header
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    video = probe_video(path)
    assert video.meta.total_frames == len(decoded) == 30 and video.meta.width == 112
    plan = plan_video(video.meta, ImageProcessorSettings(min_pixels=84 * 112, max_pixels=84 * 112), video.sampling)
    clip = read_frames(video, plan)
    assert np.array_equal(clip.frames, np.stack(decoded)[plan.indices])


@pytest.mark.parametrize("fmt, ext, expected", [("avi", "avi", "ends after"), ("mov", "mov", "could not be decoded")])
def test_a_truncated_video_is_one_sentence(pipeline, tmp_path, fmt, ext, expected):
    path = encode(synthetic_frames(40, 84, 112), tmp_path / f"whole.{ext}", fmt)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EdgevlError) as e:
        pipeline.prepare("What happens?", videos=[cut])
    assert expected in str(e.value) and one_sentence(str(e.value)) and "cut." in str(e.value)


def test_a_long_video_is_fitted_to_the_context_and_generates(pipeline, tmp_path, monkeypatch):
    from edgevl.runtime.inputs.video import probe_video
    path = encode(np.repeat(synthetic_frames(2, 84, 112), 300, axis=0), tmp_path / "long.mp4", fps=1)  # 10 minutes
    monkeypatch.setattr(pipeline, "max_context", 512)
    video = probe_video(path, fps=2.0, max_frames=600)
    plan = pipeline.plan_messages([{"role": "user", "content": [{"type": "video"}] + TEXT}], videos=[video])
    (fitted,) = plan.video_plans
    assert fitted.fitted and fitted.tokens < plan.tokens < 512 and fitted.sampled == 600
    result = pipeline.generate("What happens?", videos=[video], max_new_tokens=2, do_sample=False)
    assert len(result.prompt_token_ids) <= 511 and len(result.token_ids) >= 1


def test_a_chat_turns_video_is_fitted_to_what_the_conversation_left(pipeline, photos, tmp_path, monkeypatch):
    from edgevl.runtime.chat import ChatSession
    path = encode(np.repeat(synthetic_frames(2, 84, 112), 120, axis=0), tmp_path / "long.mp4", fps=1)  # 4 minutes
    monkeypatch.setattr(pipeline, "max_context", 768)
    chat = ChatSession(pipeline)
    first = chat.send("What is this?", images=[photos["astronaut"]], max_new_tokens=2, do_sample=False)
    second = chat.send("And this?", videos=[path], max_new_tokens=2, do_sample=False)
    assert len(first.prompt_token_ids) < len(second.prompt_token_ids) <= 767
    t, h, w = chat.video_grids[0]
    assert t * h * w < 120 * 6 * 8                              # less than the video processor alone: 120 x 84x112
    with pytest.raises(EdgevlError, match=r"the conversation would need at least \d+ tokens .* /reset"):
        chat.send("And these?", videos=[path, path], images=[photos["coffee"]] * 3, max_new_tokens=2)


# ----------------------------------------------------------------------------- server and Triton
@pytest.fixture
def app(pipeline):
    """A fresh app each time: a TestClient closes its app's scheduler when it leaves."""
    from edgevl.serve.app import ServerSettings, create_app
    from edgevl.serve.requests import RequestLimits
    return create_app(pipeline, "tiny", ServerSettings(RequestLimits(max_image_pixels=4096 * 4096)))


def image_parts(data: bytes, n: int) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [{"type": "image_url", "image_url": {"url": url}} for _ in range(n)] + TEXT


def test_the_server_refuses_forty_images_before_decoding(app, no_decoding):
    from fastapi.testclient import TestClient
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": image_parts(solid_png(), 40)}]})
    assert 2_000_000 < len(body) < 4_000_000                               # the issue's ~3 MB body
    with TestClient(app) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - t0
    error = assert_error_shape(r, 400)
    assert error["code"] == "context_length_exceeded" and "for 40 images" in error["message"]
    assert elapsed < 1.0


def test_a_text_over_the_context_has_openais_code(app):
    from fastapi.testclient import TestClient
    with TestClient(app) as client:
        for words in (20000, 200000):    # counted after tokenizing / refused from its bytes before tokenizing
            body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * words}]}
            error = assert_error_shape(client.post("/v1/chat/completions", json=body), 400)
            assert error["code"] == "context_length_exceeded" and "32768 tokens" in error["message"]


def test_a_video_over_the_pixel_limit_says_video(tmp_path):
    from fastapi.testclient import TestClient

    from edgevl.serve.app import ServerSettings, create_app
    from edgevl.serve.requests import RequestLimits
    path = encode(synthetic_frames(4, 112, 168), tmp_path / "v.mp4")
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    part = {"type": "video_url", "video_url": {"url": url}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [part] + TEXT}]}
    with TestClient(create_app(_NoPlan(), "tiny", ServerSettings(RequestLimits(max_image_pixels=1000)))) as client:
        error = assert_error_shape(client.post("/v1/chat/completions", json=body), 413)
    assert error["code"] == "video_too_large" and error["message"].startswith("the video has 168x112 frames")
    assert "image" not in error["message"]


class _NoPlan:
    """A pipeline the request never reaches: the pixel limit is checked while the request is read."""

    generation_config: dict = {}
    video_settings = None

    def plan_messages(self, messages, images, videos):
        raise AssertionError("the request should have been refused while it was read")

    def sampling_options(self, **sampling):
        from edgevl.runtime.sampling import SamplingOptions
        return SamplingOptions.from_generation_config(self.generation_config, **sampling)


def test_health_answers_while_a_request_decodes(app, photos, monkeypatch):
    """Headers are read on a worker thread and pixels decoded on the preparing thread: the event loop stays free."""
    import httpx

    import edgevl.runtime.inputs.plan as inputs
    import edgevl.serve.requests as requests
    slow_header, slow_decode = requests.read_image_header, inputs.preprocess_image

    def header(*args, **kwargs):
        time.sleep(1.0)
        return slow_header(*args, **kwargs)

    def decode(*args, **kwargs):
        time.sleep(1.0)
        return slow_decode(*args, **kwargs)
    monkeypatch.setattr(requests, "read_image_header", header)
    monkeypatch.setattr(inputs, "preprocess_image", decode)
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": image_parts(Path(photos["astronaut"]).read_bytes(), 1)}]}
    with running(app) as base:
        done = {}
        thread = threading.Thread(target=lambda: done.setdefault("r", httpx.post(f"{base}/v1/chat/completions",
                                                                                json=body, timeout=60)))
        thread.start()
        latencies = []
        while thread.is_alive():
            t0 = time.perf_counter()
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        thread.join()
    assert done["r"].status_code == 200, done["r"].text
    assert len(latencies) >= 10 and max(latencies) < 0.5


def test_triton_refuses_forty_images_before_decoding(pipeline, no_decoding):
    from edgevl.serve.triton.handler import EdgevlTritonModel
    from edgevl.serve.triton.protocol import TRITON_LIMITS, RequestError
    model = EdgevlTritonModel.__new__(EdgevlTritonModel)
    model.pipe, model.limits, model.decoupled = pipeline, TRITON_LIMITS, True
    model.pb = types.SimpleNamespace(get_input_tensor_by_name=lambda request, name: request.get(name))
    messages = [{"role": "user", "content": [{"type": "image"}] * 40 + TEXT}]
    tensor = types.SimpleNamespace
    request = {"messages": tensor(as_numpy=lambda: np.array([json.dumps(messages).encode()], dtype=object)),
               "images": tensor(as_numpy=lambda: np.array([solid_png()] * 40, dtype=object))}
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match=r"for 40 images\) but the model.s context is"):
        model._read(request)
    assert time.perf_counter() - t0 < 1.0


def test_bench_refuses_a_prompt_longer_than_the_context_before_building_it(tiny_artifact, capsys):
    from edgevl.cli import main
    t0 = time.perf_counter()
    assert main(["bench", str(tiny_artifact), "--prompt-tokens", "1000000000"]) == 2
    assert time.perf_counter() - t0 < 5                     # no gigabyte string, no bandwidth probe first
    message = capsys.readouterr().err.strip()
    assert "--prompt-tokens 1000000000 is more than" in message and "at most 32767" in message
    assert one_sentence(message.split("error: ", 1)[1])
