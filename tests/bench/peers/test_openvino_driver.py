"""bench/peers/openvino_driver.py (run in the peer's own environment): the pipeline's prefix cache is turned off."""

from __future__ import annotations

import importlib.util
import sys
import types

from edgevl.bench.peers import openvino


def test_openvino_driver_turns_the_pipelines_prefix_cache_off():
    """VLMPipeline's CPU default reuses the previous generate()'s KV cache for a matching prefix: every
    benchmark run after the first would skip its prefill. The driver passes a scheduler config without it."""
    spec = importlib.util.spec_from_file_location("openvino_driver", openvino.DRIVER)
    openvino_driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(openvino_driver)
    genai = types.SimpleNamespace(SchedulerConfig=lambda: types.SimpleNamespace(
        max_num_batched_tokens=256, enable_prefix_caching=True))
    props = openvino_driver.pipeline_properties(genai, {"properties": {"KV_CACHE_PRECISION": "f32"},
                                                        "prefix_caching": False})
    scheduler = props.pop("scheduler_config")
    assert props == {"KV_CACHE_PRECISION": "f32"}
    assert scheduler.enable_prefix_caching is False and scheduler.max_num_batched_tokens == sys.maxsize
    assert "scheduler_config" not in openvino_driver.pipeline_properties(genai, {"prefix_caching": True})
