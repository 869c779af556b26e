"""Tests of the benchmark's peers (edgevl/bench/peers/) without the peers installed, and what they share: the peers'
real output captured in tests/data/peers/, and a stand-in set-up."""

from __future__ import annotations

from pathlib import Path

from edgevl.bench.peers import driver

DATA = Path(__file__).parents[2] / "data" / "peers"
MTMD_LOG = (DATA / "llama-mtmd-cli-q8_0.stderr.txt").read_text()
STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")


def fake_setup(tmp_path: Path, name: str = "llama.cpp") -> driver.PeerSetup:
    keys = ("python", "source", "mtmd_cli", "quantize", "bench", "optimum_cli")
    return driver.PeerSetup(name, tmp_path, {"paths": {k: f"/peer/{k}" for k in keys},
                                             "versions": {"tool": "1.0"}, "build": "test build"})
