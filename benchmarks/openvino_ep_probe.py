"""Does onnxruntime's OpenVINO execution provider run an edgevl vision graph faster than the CPU provider, and at
what precision? A probe for fp32 users on bf16-capable CPUs (issue: OpenVINO GenAI's default computes in bf16,
onnxruntime's CPU provider has no bf16 MatMul kernel).

onnxruntime-openvino is its own build of onnxruntime (same import name, its own version), so it lives in its own
venv, and the probe has two halves:

    .venv/bin/python benchmarks/openvino_ep_probe.py capture ARTIFACT FEED.npz
        the vision graph's inputs for one synthetic 448x448 image, as the runtime feeds them
    OVENV/bin/python benchmarks/openvino_ep_probe.py run ARTIFACT/vision.onnx FEED.npz
        the graph on the CPU provider, then on the OpenVINO provider with INFERENCE_PRECISION_HINT f32 and bf16
        (load_config): median ms of 4 runs after a warm-up, and the largest output difference relative to the
        CPU provider's largest output value

    python3 -m venv OVENV && OVENV/bin/pip install onnxruntime-openvino numpy
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HINTS = {"f32": {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}, "bf16": {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}}


def capture(artifact: str, out: str) -> None:
    from edgevl.artifact import load_artifact
    from edgevl.bench.measure import EdgevlEngine, synthetic_image
    engine = EdgevlEngine(load_artifact(artifact))
    prepared = engine.prepare("Describe this image.", synthetic_image(448, 448, Path(out).parent))
    feeds = {}
    runner = engine.pipe.vision
    infer = runner.infer

    def recording(feed, bindings=None):
        feeds.update({k: np.array(v) for k, v in feed.items() if isinstance(v, np.ndarray)})
        return infer(feed, bindings)

    runner.infer = recording
    engine.encode(prepared)
    np.savez(out, **feeds)
    print({k: v.shape for k, v in feeds.items()})


def _median_run(session, feed, runs: int = 4):
    session.run(None, feed)
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], out


def run(graph: str, feed_path: str) -> None:
    import onnxruntime as ort
    feed = dict(np.load(feed_path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    base_ms, base = _median_run(ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]), feed)
    rows = {"onnxruntime": ort.__version__, "cpu_ms": round(base_ms, 1)}
    for name, config in HINTS.items():
        session = ort.InferenceSession(graph, options, providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"],
                                       provider_options=[{"device_type": "CPU", "load_config": json.dumps(config)}, {}])
        ms, out = _median_run(session, feed)
        error = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in zip(out, base))
        rows[f"openvino_{name}"] = {"ms": round(ms, 1), "ratio_to_cpu": round(ms / base_ms, 3),
                                    "max_rel_error": float(f"{error:.3g}")}
    print(json.dumps(rows))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"capture": capture, "run": run}[command](*args)
