"""Qwen2-VL end to end: the torch-free runtime vs transformers' generate(), token for token, on photos, two images,
text, a batch of two prompts, and real inputs that naive attention cannot hold (a large photo and an 8k-token prompt,
in memory that does not grow with the square of the sequence).

The transformers side (tests/hf_reference.py and the `hf_inputs` fixture) builds its
inputs the way Qwen2VLProcessor does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgevl.bench.machine import PeakRSS
from tests.hf_reference import NEW_TOKENS, hf_generate, strip_after_eos


CASES = {
    "one_image": ("Describe this image in detail.", ["astronaut"]),
    "odd_sized_image": ("What is in the picture?", ["chelsea_odd"]),
    "grayscale_image": ("What is shown?", ["camera_gray"]),
    "rgba_image": ("Describe the rocket.", ["rocket_rgba"]),
    "two_images": ("Compare the two pictures.", ["astronaut", "coffee"]),
    "text_only": ("Write a short story about a robot who learns to paint.", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, any_pipeline, hf_model, hf_inputs, photos):
    pipeline = any_pipeline
    prompt, names = CASES[case]
    paths = [photos[n] for n in names]
    ids, extra = hf_inputs(prompt, paths)
    ours = pipeline.generate(prompt, images=paths, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.prompt_token_ids == ids[0].tolist()
    ref = hf_generate(hf_model, ids, extra)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config.eos_token_id)
    assert len(ours.token_ids) >= NEW_TOKENS or ours.finish_reason == "eos"


def test_greedy_without_repetition_penalty(any_pipeline, hf_model, hf_inputs, photos):
    pipeline = any_pipeline
    ids, extra = hf_inputs("Tell me about the cup.", [photos["coffee"]])
    ours = pipeline.generate("Tell me about the cup.", images=[photos["coffee"]], max_new_tokens=NEW_TOKENS,
                             do_sample=False, repetition_penalty=1.0)
    ref = hf_generate(hf_model, ids, extra, repetition_penalty=1.0)[0].tolist()
    assert ours.token_ids == strip_after_eos(ref, pipeline.config.eos_token_id)


def test_batch_of_two_prompts_of_different_lengths(any_pipeline, hf_model, hf_inputs, photos):
    """A batch (right-padded for the in-place cache, left-padded for the concat one): each row equals
    transformers' left-padded batched generate (and its own single run)."""
    pipeline = any_pipeline
    prompts = ["Describe this image.", "A much longer question about the second picture, asked in many words?"]
    images = [[photos["astronaut"]], [photos["coffee"]]]
    ours = pipeline.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, do_sample=False)
    built = [hf_inputs(p, imgs) for p, imgs in zip(prompts, images)]
    width = max(ids.shape[1] for ids, _ in built)
    pad = pipeline.config.pad_token_id
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, (row, _) in enumerate(built):
        ids[b, width - row.shape[1]:] = row[0]
        mask[b, width - row.shape[1]:] = 1
    extra = {"pixel_values": torch.cat([e["pixel_values"] for _, e in built]),
             "image_grid_thw": torch.cat([e["image_grid_thw"] for _, e in built])}
    ref = hf_generate(hf_model, ids, extra, attention_mask=mask)
    for b in range(2):
        assert ours[b].token_ids == strip_after_eos(ref[b].tolist(), pipeline.config.eos_token_id)
        single = pipeline.generate(prompts[b], images=images[b], max_new_tokens=NEW_TOKENS, do_sample=False)
        assert single.token_ids == ours[b].token_ids


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
