"""Which kernels OpenVINO's CPU plugin runs for a converted Qwen3-VL model: time per (node type, kernel) from its
own per-node counters (PERF_COUNT), for the vision tower or one text-only prefill of the language model.

Runs in the OpenVINO peer's environment (benchmarks/setup_peers.sh), on a folder `make bench-compare` converted:

    ~/.cache/edgevl/peers/openvino/venv/bin/python benchmarks/openvino_kernels.py MODEL_FOLDER --graph vision
    ~/.cache/edgevl/peers/openvino/venv/bin/python benchmarks/openvino_kernels.py MODEL_FOLDER --graph language --tokens 213

The language model is compiled as converted, so its lm_head runs on every prompt position (VLMPipeline slices
the last one first): read the layers' rows, not the total. Qwen3-VL only (the inputs are that export's).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HINTS = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "PERFORMANCE_HINT": "LATENCY"}


def vision_feed(patches: int, width: int) -> dict:
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((patches, width)).astype(np.float32),
            "attention_mask": np.zeros((1, patches, patches), np.float32),
            "rotary_pos_emb": rng.standard_normal((patches, 32)).astype(np.float32)}


def language_feed(tokens: int, hidden: int, levels: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"attention_mask": np.ones((1, tokens), np.int64),
            "position_ids": np.broadcast_to(np.arange(tokens), (3, 1, tokens)).astype(np.int64).copy(),
            "inputs_embeds": (rng.standard_normal((1, tokens, hidden)) * 0.02).astype(np.float32),
            "visual_pos_masks": np.zeros((1, tokens), bool),
            "deepstack_visual_embeds": np.zeros((levels, 0, hidden), np.float32),
            "beam_idx": np.zeros(1, np.int32)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="an OpenVINO model folder (openvino_*_model.xml)")
    p.add_argument("--graph", choices=["vision", "language"], default="vision")
    p.add_argument("--patches", type=int, default=784, help="vision: patches (784 = a 448x448 image)")
    p.add_argument("--tokens", type=int, default=213, help="language: prompt tokens")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)

    import openvino as ov
    core = ov.Core()
    xml = "openvino_vision_embeddings_merger_model.xml" if args.graph == "vision" else "openvino_language_model.xml"
    model = core.read_model(str(args.model / xml))
    width = model.input("hidden_states" if args.graph == "vision" else "inputs_embeds").get_partial_shape()[-1]
    feed = vision_feed(args.patches, width.get_length()) if args.graph == "vision" else \
        language_feed(args.tokens, width.get_length())
    request = core.compile_model(model, "CPU", {**HINTS, "PERF_COUNT": "YES"}).create_infer_request()
    walls, totals, nodes = [], defaultdict(float), defaultdict(float)
    for i in range(1 + args.runs):
        if args.graph == "language":
            request.reset_state()
        t0 = time.perf_counter()
        request.infer(feed)
        if i:                                    # the counters are the last call's; the first call is a warm-up
            walls.append((time.perf_counter() - t0) * 1e3)
            for info in request.profiling_info:
                ms = info.real_time.total_seconds() * 1e3 / args.runs
                totals[(info.node_type, info.exec_type)] += ms
                nodes[(info.node_name, info.exec_type)] += ms
    total = sum(totals.values())
    print(f"{args.model.name} {args.graph}: wall {', '.join(f'{w:.0f}' for w in walls)} ms; f32 hints")
    print(f"{'node type':<36} {'kernel':<22} {'ms/run':>9} {'share':>7}")
    for (kind, kernel), ms in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{kind:<36} {kernel:<22} {ms:9.1f} {ms / total:7.1%}")
    print(f"\nslowest {args.top} nodes:")
    for (name, kernel), ms in sorted(nodes.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:8.1f} ms  {kernel:<22} {name}")


if __name__ == "__main__":
    main()
