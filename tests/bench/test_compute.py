"""bench/compute.py: the vision and decoder FLOP counts equal torch's flop counter on the transformers models, and the
GEMM rate is measured for fp32 and int8."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.bench.compute import decoder_flops, measure_gemm, vision_flops


@pytest.fixture(scope="module")
def tiny_2_5_dir(tmp_path_factory):
    from edgevl.synthetic.random_model import write_random_model
    return write_random_model(tmp_path_factory.mktemp("tiny25") / "model", preset="tiny-2.5")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grid", [(1, 8, 12), (2, 4, 6), (1, 10, 14)])
def test_flop_counts_equal_torch_flop_counter_on_the_transformers_model(family, grid, request):
    # eager attention: torch's counter sees every matrix product as mm/bmm (its sdpa rule counts differently);
    # Qwen2.5-VL's eager vision attention runs window by window, so partial windows count as they are
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from edgevl.bench.reference import model_class
    from edgevl.export.exporter import model_facts
    model_dir = request.getfixturevalue("tiny_model_dir" if family == "qwen2_vl" else "tiny_2_5_dir")
    config = model_facts(AutoConfig.from_pretrained(model_dir), {})
    model = model_class(family).from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    pixels = torch.randn(int(np.prod(grid)), 3 * config.temporal_patch_size * config.patch_size ** 2)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixels, torch.tensor([grid]))
    assert counter.get_total_flops() == vision_flops(config, grid)
    ids = torch.randint(0, 100, (1, 37))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == decoder_flops(config, 37)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids[:, :1], cache=out.cache, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == decoder_flops(config, 1, past=37)


def test_gemm_rate_is_measured_for_fp32_and_int8():
    gemm = measure_gemm(threads=1, shape=(64, 128, 256), repeats=2)
    assert gemm["fp32_flops_per_s"] > 1e6 and gemm["int8_flops_per_s"] > 1e6
    assert gemm["shape"] == [64, 128, 256] and "not the hardware peak" in gemm["method"]
