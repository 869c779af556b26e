"""Peak memory follows what the token budget (runtime/inputs/budget.py) keeps, not the input: each case runs in a fresh
process that resets its peak RSS (Linux's /proc/self/clear_refs) once the model is loaded and reports how far it rose
above that baseline (tests/peak_rss.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.peak_rss import MB, NEEDS_PEAK_RESET, measure


pytestmark = NEEDS_PEAK_RESET


def solid_png(size: int = 4096) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 140, 220)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """Ten minutes of 1280x720 at one frame per 6 s (100 frames, MPEG-4 with few keyframes: ~1 s to write)."""
    av = pytest.importorskip("av")
    from fractions import Fraction
    path = tmp_path_factory.mktemp("long") / "ten_minutes_720p.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(1, 6))
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 1280, 720, "yuv420p", 1000
        frames = [av.VideoFrame.from_image(Image.effect_mandelbrot((1280, 720), box, 60).convert("RGB"))
                  .reformat(format="yuv420p") for box in ((-2, -1.2, 1, 1.2), (-1, -0.5, 0, 0.5))]
        for i in range(100):
            frame = frames[(i // 25) % 2]
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_long_video_peaks_at_what_its_budget_keeps(tiny_artifact, long_video):
    got = measure("""
import time
from edgevl.runtime.backends.options import BackendOptions
from edgevl.runtime.pipeline import Pipeline
from edgevl.runtime.inputs.video import probe_video
pipe = Pipeline.load(sys.argv[1], options=BackendOptions(max_context=4096))
base, t0 = reset(), time.perf_counter()
video = probe_video(sys.argv[2])
plan = pipe.plan_messages([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
                          videos=[video])
row = pipe.prepare_plan(plan)
result = pipe.generate_prepared([row], pipe.decoding(1))[0]
p = plan.video_plans[0]
report(seconds=time.perf_counter() - t0, peak=status("VmHWM") - base, tokens=len(result.prompt_token_ids), frames=len(p.indices), sampled=p.sampled,
       size=p.size, kept=row.video_pixel_values[0].nbytes + len(p.indices) * p.size[0] * p.size[1] * 3)
""", str(tiny_artifact), str(long_video))
    assert got["sampled"] == 100 and got["tokens"] < 4096
    # 100 frames of 720p at the processor's own size would be ~0.3 GB as bytes and ~1.1 GB as floats (twice, while
    # patchified); what the budget keeps is ~80 MB: the peak is that plus a decoder's frames and the model's work.
    assert got["kept"] < 100 * MB and got["peak"] < 2 * got["kept"] + 200 * MB, got


def test_run_refuses_an_over_budget_image_set_before_decoding(tiny_artifact, tmp_path):
    image = tmp_path / "solid.png"
    image.write_bytes(solid_png())
    got = measure("""
import time
import edgevl.cli.run as run
from edgevl.cli import main
load, seen = run.load_pipeline, {}
def loaded(args):
    pipe = load(args)
    seen["base"], seen["t0"] = reset(), time.perf_counter()
    return pipe
run.load_pipeline = loaded
argv = ["run", sys.argv[1], "--prompt", "Describe them."] + ["--image", sys.argv[2]] * 40
code = main(argv)
report(code=code, peak=status("VmHWM") - seen["base"], seconds=time.perf_counter() - seen["t0"])
""", str(tiny_artifact), str(image))
    # Decoding them would hold 40 x 48 MB of pixels at once or one after another (~2 GB of floats kept).
    assert got["code"] == 2 and got["seconds"] < 1.0 and got["peak"] < 30 * MB, got


def test_the_server_refuses_forty_images_with_little_memory_and_gives_memory_back(tiny_artifact, tmp_path):
    url = tmp_path / "url.txt"
    url.write_text("data:image/png;base64," + base64.b64encode(solid_png()).decode())
    got = measure("""
import dataclasses, time
from fastapi.testclient import TestClient
import edgevl.serve.scheduler.batching as batching
from edgevl.runtime.pipeline import Pipeline
trims, trim = [], batching.trim_heap
batching.trim_heap = lambda: (trims.append(1), trim())
from edgevl.serve.app import ServerSettings, create_app
pipe = Pipeline.load(sys.argv[1])
own = pipe.image_settings          # 16384 tokens per 16 MP image: forty of them are 655360 tokens
url = open(sys.argv[2]).read()
def body(n):
    parts = [{"type": "image_url", "image_url": {"url": url}}] * n + [{"type": "text", "text": "Describe."}]
    return {"model": "tiny", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": parts}]}
def idle_rss(app):
    while app.state.scheduler.jobs:
        time.sleep(0.05)
    time.sleep(0.5)
    return status("VmRSS")
app = create_app(pipe, "tiny", ServerSettings())
with TestClient(app) as client:
    pipe.image_settings = dataclasses.replace(own, max_pixels=256 * 28 * 28)
    assert client.post("/v1/chat/completions", json=body(1)).status_code == 200   # warm: arenas, caches
    pipe.image_settings = own
    warm = idle_rss(app)
    base = reset()
    t0 = time.perf_counter()
    refused = client.post("/v1/chat/completions", json=body(40))
    seconds, refused_peak = time.perf_counter() - t0, status("VmHWM") - base
    # 256 tokens per image: the accepted request spends its time decoding, not in the tiny vision encoder
    pipe.image_settings = dataclasses.replace(own, max_pixels=256 * 28 * 28)
    accepted = client.post("/v1/chat/completions", json=body(6))
    after = idle_rss(app)
    report(refused=refused.status_code, code=refused.json()["error"]["code"], seconds=seconds, peak=refused_peak,
           accepted=accepted.status_code, accepted_peak=status("VmHWM") - base, held=after - warm, trims=len(trims))
""", str(tiny_artifact), str(url), timeout=180)
    assert got["refused"] == 400 and got["code"] == "context_length_exceeded"
    assert got["seconds"] < 1.0 and got["peak"] < 60 * MB, got              # a 3 MB body, parsed; no pixel decoded
    # six 16 MP images decoded one at a time (~50 MB each) and kept at 256 tokens each; once the server is idle
    # nothing of them is held, and the heaps were trimmed
    assert got["accepted"] == 200 and got["accepted_peak"] < 400 * MB and got["held"] < 60 * MB, got
    assert got["trims"] >= 1
