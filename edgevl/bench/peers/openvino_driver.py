"""Measure OpenVINO GenAI's VLMPipeline: run with the OpenVINO peer's Python, never imported by edgevl.

    python openvino_driver.py REQUEST.json      -> one JSON object on stdout's last line

REQUEST: {"model": folder, "device": "CPU", "properties": {...}, "image": path, "prompt": text,
"new_tokens": N, "runs": R, "warmup": W, "prefix_caching": false}. With prefix_caching false (the
default) the pipeline gets the scheduler VLMPipeline picks by itself on a CPU (continuous batching, no
limit on batched tokens) with its prefix cache off: otherwise each run after the first finds the
previous run's KV cache for the same image and prompt and prefills only the last token (measured on
the 2b-l4 fp32 export: 53-79 ms instead of ~290 ms), and TTFT would not include the prefill.
The pipeline is created W + R times (the last one kept; each creation timed after reading the
folder's files into the page cache, the first W discarded), then generate() runs W + R times, greedy
with ignore_eos, the image read once beforehand. Reported per measured run, from the pipeline's own
perf metrics: TTFT (tokenization, the vision encoder, the embedding merge and the prefill together),
inside it the tokenization and the embeddings' preparation where this genai version times them,
every later token's duration, the generate() duration and the prompt and generated token counts.
Also: the peak RSS of this process during the runs, its RSS before loading, and the CPU plugin's
effective precision properties (what a property not given defaults to here).
"""

from __future__ import annotations

import json
import os
import sys
import time

# Run as a script, this folder comes first on sys.path and its modules (openvino.py above all) would shadow
# the peer's own packages: drop it.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)


def _warm(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def pipeline_properties(genai, req: dict) -> dict:
    """VLMPipeline's keyword properties for `req`: its plugin properties, plus a scheduler config with the
    prefix cache off unless the request asks for it (mirroring genai's latency-oriented default otherwise)."""
    props = dict(req.get("properties") or {})
    if not req.get("prefix_caching", False):
        scheduler = genai.SchedulerConfig()
        scheduler.max_num_batched_tokens = sys.maxsize      # as the default: prompts are never split
        scheduler.enable_prefix_caching = False
        props["scheduler_config"] = scheduler
    return props


def _stage_split(m) -> dict:
    """What VLMPerfMetrics times inside TTFT, where this version has it, in ms: the prompt's tokenization and
    the embeddings' preparation (image preprocessing, the vision models, the merge with the text embeddings).
    The rest of TTFT is the prefill; `raw_metrics.inference_durations` is no help there, since with the
    continuous-batching backend its one entry sums the prefill and every decode step."""
    out = {}
    for key, getter in (("tokenization_ms", "get_tokenization_duration"),
                        ("prepare_embeddings_ms", "get_prepare_embeddings_duration")):
        try:
            out[key] = float(getattr(m, getter)().mean)
        except Exception:   # an older openvino-genai without it
            pass
    return out


def main(path: str) -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai
    from PIL import Image

    req = json.load(open(path))
    props = pipeline_properties(genai, req)
    rss_before = _rss_kb("VmRSS") * 1024
    loads, pipe = [], None
    for _ in range(req["warmup"] + req["runs"]):
        pipe = None
        _warm(req["model"])
        t0 = time.perf_counter()
        pipe = genai.VLMPipeline(req["model"], req.get("device", "CPU"), **props)
        loads.append(time.perf_counter() - t0)
    image = ov.Tensor(np.array(Image.open(req["image"]).convert("RGB"))[None])
    config = genai.GenerationConfig()
    config.max_new_tokens, config.min_new_tokens = req["new_tokens"], req["new_tokens"]
    config.ignore_eos, config.do_sample = True, False
    try:
        with open("/proc/self/clear_refs", "w") as f:   # peak RSS of the runs, not of the loads
            f.write("5")
    except OSError:
        pass
    runs = []
    for i in range(req["warmup"] + req["runs"]):
        t0 = time.perf_counter()
        result = pipe.generate(req["prompt"], images=[image], generation_config=config)
        wall = time.perf_counter() - t0
        m = result.perf_metrics
        if i >= req["warmup"]:
            runs.append({"ttft_ms": m.get_ttft().mean, "tpot_ms": m.get_tpot().mean, **_stage_split(m),
                         "decode_ms": [d / 1e3 for d in m.raw_metrics.m_durations],
                         "generate_ms": m.get_generate_duration().mean, "wall_ms": wall * 1e3,
                         "prompt_tokens": m.get_num_input_tokens(), "new_tokens": m.get_num_generated_tokens()})
    core = ov.Core()
    effective = {}
    for name in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
                 "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT"):
        try:
            value = props[name] if name in props else core.get_property("CPU", name)
            effective[name] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        except Exception:   # a property this plugin version does not have
            pass
    print(json.dumps({"load_s": loads[req["warmup"]:], "runs": runs, "rss_before_bytes": rss_before,
                      "peak_rss_bytes": max(_rss_kb("VmHWM"), _rss_kb("VmRSS")) * 1024,
                      "effective_properties": effective,
                      "prefix_caching": "scheduler_config" not in props,
                      "versions": {"openvino": ov.__version__, "openvino_genai": genai.__version__}}))


if __name__ == "__main__":
    main(sys.argv[1])
