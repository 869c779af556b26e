"""No hard-coded dimensions: export the 2B / 7B / 72B architectures (one layer each) and check them.

Each keeps its preset's attention geometry (head_dim 128, mrope_section [16, 24, 24], the
GQA ratio) and the real ViT width; depth, vocab and MLP width are cut so the test runs on a
small CPU. The 72B's 64 heads are scaled to 16 with the same 8:1 GQA ratio.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgevl.synthetic.architectures import PRESETS, TINY_VOCAB_SIZE

GEOMETRIES = {
    "qwen2-vl-2b": {},
    "qwen2-vl-7b": {},
    "qwen2-vl-72b": {"hidden_size": 16 * 128, "num_attention_heads": 16, "num_key_value_heads": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", [(name, "ort") for name in GEOMETRIES] + [("qwen2-vl-2b", "standard")])
def test_export_and_parity_for_each_architecture(name, variant, tmp_path, photos):
    from transformers import Qwen2VLForConditionalGeneration

    from edgevl.export.exporter import export_model
    from edgevl.runtime.generate import decoder_step
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.synthetic.random_model import write_random_model

    preset = replace(PRESETS[name], num_hidden_layers=1, vision_depth=1, vocab_size=TINY_VOCAB_SIZE,
                     intermediate_size=256, dtype="float32", **GEOMETRIES[name])
    assert preset.head_dim == 128 and sum(preset.mrope_section) == 64
    model_dir = write_random_model(tmp_path / "model", preset)
    pipe = Pipeline.load(export_model(str(model_dir), tmp_path / "out", variant=variant, log=lambda m: None),
                         backend="ort-cpu")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert pipe.config.num_attention_heads == preset.num_attention_heads
    assert pipe.config.mrope_section == (16, 24, 24)

    row = pipe.prepare("Describe.", images=[photos["chelsea_odd"]])
    (pv,), (grid,) = row.pixel_values, row.grids
    ours_vision = pipe.encode_image(pv, grid)
    with torch.no_grad():
        ref_vision = hf.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    assert np.abs(ours_vision - ref_vision).max() <= 1e-4 * max(1.0, np.abs(ref_vision).max())

    ids = row.input_ids[None]
    mask = np.ones_like(ids)
    positions, _ = pipe.positions(ids, mask, [grid])
    embeds = pipe.embed(row.input_ids, [ours_vision])[None]
    logits = decoder_step(pipe.decoder, pipe.new_cache(1), embeds, positions, np.array([ids.shape[1]]))["logits"]
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pv), image_grid_thw=torch.tensor([grid]),
                 mm_token_type_ids=torch.from_numpy((ids == hf.config.image_token_id).astype(np.int32))
                 ).logits[:, -1].numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
