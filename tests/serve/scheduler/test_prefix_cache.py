"""Prefix caching in the batch scheduler (serve/scheduler/prefix_cache.py, BatchScheduler(prefix_cache=True)): a finished
request's row keeps its KV cache; a later request sharing its tokens and images prefills only the rest."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.serve.scheduler.batching import BatchScheduler, make_scheduler
from edgevl.serve.scheduler.jobs import Job
from edgevl.runtime.generate import Decoding
from edgevl.runtime.sampling import SamplingOptions
from edgevl.serve.scheduler.prefix_cache import PadTokens, RowPrefixes, cached_vision, common_prefix, prompt_key


def pads_of(pipe) -> PadTokens:
    cfg = pipe.config
    return PadTokens(cfg.image_token_id, cfg.video_token_id, pipe.image_settings.merge_size,
                     pipe.video_settings.merge_size)


def keys_of(pipe, prompt):
    return prompt_key(prompt, pads_of(pipe))


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def job_for(prepare, max_new=8) -> Job:
    return Job(prepare, Decoding(SamplingOptions(do_sample=False), max_new))


@pytest.fixture()
def counted_vision(pipeline, monkeypatch):
    calls = []
    encode = pipeline.vision_encoder.call            # one vision graph call

    def counting(pixels, grid):
        calls.append(grid)
        return encode(pixels, grid)
    monkeypatch.setattr(pipeline.vision_encoder, "call", counting)
    return calls


# ----------------------------------------------------------------------------- the pure bookkeeping
def test_keys_tell_images_of_one_size_apart(pipeline, photos):
    cat = Image.open(photos["astronaut"]).convert("RGB")
    other = Image.fromarray(255 - np.asarray(cat))          # same size, other pixels: the same pad tokens
    a, b = (pipeline.prepare("What is this?", [im]) for im in (cat, other))
    assert np.array_equal(a.input_ids, b.input_ids)
    ka, kb = keys_of(pipeline, a), keys_of(pipeline, b)
    first_pad = int(np.flatnonzero(a.input_ids == pipeline.config.image_token_id)[0])
    assert common_prefix(ka, kb) == first_pad                 # the two photos share nothing past their first pad
    assert np.array_equal(ka, keys_of(pipeline, pipeline.prepare("What is this?", [cat])))
    assert (ka[a.input_ids != pipeline.config.image_token_id] >= 0).all() and (ka[first_pad:][:4] < 0).all()
    text = pipeline.prepare("Hi")
    assert np.array_equal(keys_of(pipeline, text), text.input_ids)


def test_cached_vision_is_the_images_wholly_inside_the_kept_prefix(pipeline, photos):
    p = pipeline.prepare_messages([user("one", 1), user("two", 1)], [photos["coffee"], photos["chelsea_odd"]])
    cfg, merge = pipeline.config, pipeline.image_settings.merge_size
    pads = np.flatnonzero(p.input_ids == cfg.image_token_id)
    first_end = int(np.prod(p.grids[0])) // merge ** 2
    inside = lambda keep: set(cached_vision(p, keep, pads_of(pipeline)))   # noqa: E731
    assert inside(int(pads[0])) == set()
    assert inside(int(pads[first_end - 1])) == set()                    # its last pad is not kept yet
    assert inside(int(pads[first_end - 1]) + 1) == {("image", 0)}
    assert inside(len(p.input_ids)) == {("image", 0), ("image", 1)}
    assert cached_vision(p, len(p.input_ids), pads_of(pipeline))[("image", 0)] == first_end      # its pad count


def test_best_row_reuses_what_is_worth_it_keeps_one_token_and_spares_other_conversations():
    rows = RowPrefixes(4)
    rows.remember(1, np.array([5, 6, 7, 8]))
    rows.remember(3, np.array([5, 6, 9]))
    assert rows.best([0, 1, 2, 3], np.array([5, 6, 7, 8, 1])) == (1, 4)
    assert rows.best([0, 1, 2, 3], np.array([5, 6, 7, 8])) == (1, 3)    # the last token is prefilled again
    assert rows.best([0, 2, 3], np.array([5, 6, 9, 9])) == (3, 3)
    assert rows.best([0, 2], np.array([1, 2])) == (0, 0)                # nothing shared: the lowest free row
    rows.forget(1)
    assert rows.best([1, 3], np.array([5, 6, 7])) == (3, 2)            # keeps 2, throws 1 away
    rows.remember(0, np.arange(1, 11))                                    # another conversation, 10 positions
    assert rows.best([0, 1], np.array([1, 2, 99, 98])) == (1, 0)         # shares 2 of 10: an empty row instead
    assert rows.best([0], np.array([1, 2, 99, 98])) == (0, 2)            # no empty row: the longest prefix


# ----------------------------------------------------------------------------- the scheduler
def test_a_repeated_image_request_reuses_the_row_and_skips_the_vision_call(pipeline, photos, counted_vision):
    scheduler = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False, prefix_cache=True)
    ask = lambda: pipeline.prepare("What is in this picture?", [photos["coffee"]])   # noqa: E731
    first = scheduler.submit(job_for(ask))
    scheduler.run_until_idle()
    assert len(counted_vision) == 1
    second = scheduler.submit(job_for(ask))
    scheduler.run_until_idle()
    a, b = first.future.result(timeout=0), second.future.result(timeout=0)
    assert len(counted_vision) == 1                                      # the image's KV was in the row
    assert a.timings.cached_tokens == 0 and b.timings.cached_tokens == len(a.prompt_token_ids) - 1
    assert b.token_ids == a.token_ids and b.text == a.text


def test_a_repeated_video_request_skips_all_its_temporal_patches(pipeline, video_file, counted_vision):
    scheduler = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False, prefix_cache=True)
    ask = lambda: pipeline.prepare("What happens?", videos=[video_file])      # noqa: E731
    first = scheduler.submit(job_for(ask))
    scheduler.run_until_idle()
    calls = len(counted_vision)
    assert calls >= 2                                                    # one call per temporal patch
    second = scheduler.submit(job_for(ask))
    scheduler.run_until_idle()
    a, b = first.future.result(timeout=0), second.future.result(timeout=0)
    assert len(counted_vision) == calls and b.timings.cached_tokens == len(a.prompt_token_ids) - 1
    assert b.token_ids == a.token_ids


def test_a_chat_resending_its_history_prefills_only_the_new_turn(pipeline, photos, counted_vision):
    """Turn 2 = turn 1's messages + the reply + a new question, as an OpenAI client sends it: the shared
    positions come from the cache; the answer equals a fresh server's (prefix cache off)."""
    turn1 = [user("What is in this picture?", 1)]
    scheduler = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False, prefix_cache=True)
    one = scheduler.submit(job_for(lambda: pipeline.prepare_messages(turn1, [photos["coffee"]])))
    scheduler.run_until_idle()
    reply = one.future.result(timeout=0).text
    turn2 = [*turn1, {"role": "assistant", "content": [{"type": "text", "text": reply}]}, user("And the colour?")]
    prepare2 = lambda: pipeline.prepare_messages(turn2, [photos["coffee"]])   # noqa: E731
    two = scheduler.submit(job_for(prepare2))
    scheduler.run_until_idle()
    got = two.future.result(timeout=0)
    ids1 = np.asarray(one.future.result(timeout=0).prompt_token_ids)
    assert got.timings.cached_tokens >= len(ids1)                     # the whole first prompt, and more
    assert len(counted_vision) == 1
    fresh = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False)
    expected = fresh.submit(job_for(prepare2))
    fresh.run_until_idle()
    assert got.token_ids == expected.future.result(timeout=0).token_ids


def test_other_rows_decoding_beside_a_cached_row_leave_its_positions_intact(pipeline):
    """A free row that keeps a cache gets the decode steps' pad token at its length, past what it holds."""
    scheduler = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False, prefix_cache=True)
    ask = lambda: pipeline.prepare("Describe a cat.")                   # noqa: E731
    first = scheduler.submit(job_for(ask, max_new=4))
    other = scheduler.submit(job_for(lambda: pipeline.prepare("Tell me about dogs and their owners."), 24))
    scheduler.run_until_idle()          # row 0 finished first and kept its cache while row 1 decoded on
    assert other.future.result(timeout=0).token_ids and scheduler.prefixes.keys[0].size
    again = scheduler.submit(job_for(ask, max_new=4))
    scheduler.run_until_idle()
    a, b = first.future.result(timeout=0), again.future.result(timeout=0)
    assert b.timings.cached_tokens == len(a.prompt_token_ids) - 1 and b.token_ids == a.token_ids


def test_a_failed_request_leaves_no_cache_behind(pipeline):
    scheduler = BatchScheduler(pipeline, max_batch=2, max_queue=4, start=False, prefix_cache=True)
    job = scheduler.submit(job_for(lambda: pipeline.prepare("Describe a cat."), 30))
    scheduler.step()
    scheduler.step()
    job.cancel()
    scheduler.run_until_idle()
    assert not scheduler.cache.lengths.any() and all(len(k) == 0 for k in scheduler.prefixes.keys)


def test_prefix_cache_needs_the_in_place_decoder(standard_pipeline):
    with pytest.raises(EdgevlError, match="--prefix-cache"):
        make_scheduler(standard_pipeline, 2, 4, prefix_cache=True)
