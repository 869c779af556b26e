"""Real inputs that naive attention cannot hold: a large photo and an 8k-token prompt, matching transformers,
with memory that does not grow with the square of the sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgevl.bench.machine import PeakRSS
from tests.hf_reference import hf_generate, strip_after_eos


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory):
    """A 2688x2016 photograph (5.4 MP): 27648 patches, so [heads, N, N] float32 scores would be 12 GB."""
    import skimage.data
    path = tmp_path_factory.mktemp("big") / "harbour.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((2688, 2016), Image.Resampling.BICUBIC).save(path, quality=92)
    return path


def test_a_large_photo_runs_in_linear_memory_and_matches_transformers(pipeline, hf_model, big_photo):
    row = pipeline.prepare("Describe.", images=[big_photo])
    (pv,), (grid,) = row.pixel_values, row.grids
    n = pv.shape[0]
    heads = hf_model.config.vision_config.num_heads
    quadratic = heads * n * n * 4                                    # what materialized scores would take
    assert n == 27648 and quadratic > 12e9
    with PeakRSS() as peak:
        ours = pipeline.encode_image(pv, grid)
    assert peak.peak - peak.before < quadratic / 20                 # measured: a few hundred MB
    with torch.no_grad():
        ref = hf_model.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_an_8k_token_prompt_with_an_image_prefills_and_decodes_like_transformers(pipeline, hf_model, hf_inputs,
                                                                                 photos):
    filler = "The harbour was quiet at dawn, and the boats rested against the old stone pier. " * 560
    prompt = filler + "What is in the picture?"
    ids, extra = hf_inputs(prompt, [photos["coffee"]])
    assert ids.shape[1] >= 8192
    with PeakRSS() as peak:
        ours = pipeline.generate(prompt, images=[photos["coffee"]], max_new_tokens=8, do_sample=False)
    heads = hf_model.config.text_config.num_attention_heads
    assert peak.peak - peak.before < heads * ids.shape[1] ** 2 * 4 / 4   # no [heads, S, S] scores at prefill
    assert ours.prompt_token_ids == ids[0].tolist()
    ref = hf_generate(hf_model, ids, extra, max_new_tokens=8)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config.eos_token_id)
