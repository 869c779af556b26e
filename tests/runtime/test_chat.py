"""Multi-turn chat (runtime/chat.py): KV cache reuse gives the same tokens as re-running the whole conversation, also
on the device runners' code paths."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.backends import sizing
from edgevl.runtime.backends.ort import OrtIoBindingRunner
from edgevl.runtime.backends.ort_session import SessionFromOnnx
from edgevl.runtime.chat import ChatSession
from edgevl.runtime.inputs.prompt import user_message
from edgevl.runtime.inputs.video import VideoClip
from tests.data.video_frames import synthetic_frames
from tests.fake_trt import fake_trt_runners
from tests.swapped_runners import Swapped


def _fresh_run(pipeline, messages, images, videos=(), **kwargs):
    row = pipeline.prepare_messages(messages, images, videos)
    return pipeline.generate_prepared([row], pipeline.decoding(**kwargs))[0]


def test_second_turn_reuses_cache_and_matches_a_fresh_run(any_pipeline, photos):
    pipeline = any_pipeline
    chat = ChatSession(pipeline)
    first = chat.send("What is in this image?", images=[photos["coffee"]], max_new_tokens=10, do_sample=False)
    first_prefill = chat.last_prefill_tokens
    second = chat.send("And what colour is it?", max_new_tokens=10, do_sample=False)
    assert chat.last_prefill_tokens < first_prefill            # only the new turn is prefilled
    assert chat.last_prefill_tokens < len(second.prompt_token_ids) // 2

    messages = [user_message("What is in this image?", num_images=1),
                {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                user_message("And what colour is it?")]
    fresh = _fresh_run(pipeline, messages, [photos["coffee"]], max_new_tokens=10, do_sample=False)
    assert second.prompt_token_ids == fresh.prompt_token_ids
    assert second.token_ids == fresh.token_ids


def test_image_in_a_later_turn_and_reset(pipeline, photos):
    chat = ChatSession(pipeline, system="You are terse.")
    chat.send("Hello!", max_new_tokens=6, do_sample=False)
    r = chat.send("Look at this.", images=[photos["astronaut"]], max_new_tokens=6, do_sample=False)
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                *chat.messages[:-1]]
    fresh = _fresh_run(pipeline, messages, [photos["astronaut"]], max_new_tokens=6, do_sample=False)
    assert r.token_ids == fresh.token_ids
    chat.reset()
    assert chat.messages == [] and chat.cache.length == 0
    again = chat.send("Hello!", max_new_tokens=6, do_sample=False)
    new = ChatSession(pipeline, system="You are terse.").send("Hello!", max_new_tokens=6, do_sample=False)
    assert (again.prompt_token_ids, again.token_ids) == (new.prompt_token_ids, new.token_ids)


def test_context_overflow_is_a_clear_error(pipeline, monkeypatch):
    chat = ChatSession(pipeline)
    monkeypatch.setattr(pipeline, "max_context", 40)
    with pytest.raises(EdgevlError, match="/reset"):
        chat.send("word " * 60, max_new_tokens=4, do_sample=False)


def test_video_turn_equals_generate_and_the_next_turn_reuses_its_cache(pipeline):
    clip = VideoClip(synthetic_frames(8, 84, 112), 2.0, 8, np.arange(8))     # t=4 temporal patches
    chat = ChatSession(pipeline)
    first = chat.send("What happens in the video?", videos=[clip], max_new_tokens=10, do_sample=False)
    alone = pipeline.generate("What happens in the video?", videos=[clip], max_new_tokens=10, do_sample=False)
    assert (first.prompt_token_ids, first.token_ids) == (alone.prompt_token_ids, alone.token_ids)

    second = chat.send("And then?", max_new_tokens=10, do_sample=False)
    video_token = pipeline.config.video_token_id
    assert chat.last_prefill_tokens < len(second.prompt_token_ids)
    assert video_token not in second.prompt_token_ids[-chat.last_prefill_tokens:]   # the video stayed cached
    messages = [user_message("What happens in the video?", num_videos=1),
                {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                user_message("And then?")]
    fresh = _fresh_run(pipeline, messages, [], [clip], max_new_tokens=10, do_sample=False)
    assert second.prompt_token_ids == fresh.prompt_token_ids
    assert second.token_ids == fresh.token_ids


def test_images_and_a_video_file_across_turns_and_reset(pipeline, photos, video_file):
    chat = ChatSession(pipeline, system="You are terse.")
    chat.send("Look at this.", images=[photos["coffee"]], max_new_tokens=6, do_sample=False)
    r = chat.send("Now these.", images=[photos["astronaut"]], videos=[video_file], max_new_tokens=6,
                  do_sample=False)
    assert [p["type"] for p in chat.messages[-2]["content"]] == ["image", "video", "text"]   # images first
    assert len(chat.grids) == 2 and len(chat.video_grids) == 1
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                *chat.messages[:-1]]
    fresh = _fresh_run(pipeline, messages, [photos["coffee"], photos["astronaut"]], [video_file],
                       max_new_tokens=6, do_sample=False)
    assert (r.prompt_token_ids, r.token_ids) == (fresh.prompt_token_ids, fresh.token_ids)
    chat.reset()
    assert chat.videos == [] and chat.video_grids == [] and chat.cache.length == 0


def test_a_failed_video_turn_leaves_the_conversation_as_it_was(pipeline, tmp_path):
    chat = ChatSession(pipeline)
    chat.send("Hello!", max_new_tokens=4, do_sample=False)
    before = (list(chat.messages), chat.cached_ids.copy())
    with pytest.raises(EdgevlError, match="missing.mp4"):
        chat.send("What happens?", videos=[tmp_path / "missing.mp4"], max_new_tokens=4, do_sample=False)
    assert chat.messages == before[0] and np.array_equal(chat.cached_ids, before[1])
    assert chat.video_grids == [] and chat.videos == []


def _chat(pipeline, photo):
    from edgevl.runtime.chat import ChatSession
    chat = ChatSession(pipeline)
    first = chat.send("What is in this image?", images=[photo], max_new_tokens=8, do_sample=False)
    second = chat.send("And what colour is it?", max_new_tokens=8, do_sample=False)
    return first.token_ids, second.token_ids, chat.last_prefill_tokens


def test_chat_reuses_a_device_cache(pipeline, standard_pipeline, photos, art):
    """Multi-turn chat (cache kept, then cut to the common prefix) on the device runners' code paths:
    the in-place cache on the IO-binding runner, the concat cache on it and on the TensorRT runner."""
    expected = _chat(pipeline, photos["coffee"])
    for pipe in (pipeline, standard_pipeline):
        io = OrtIoBindingRunner(SessionFromOnnx(pipe.artifact.graph_path("decoder")), device="cpu")
        io.activate()
        with Swapped(pipe, pipe.vision, io):
            assert _chat(pipe, photos["coffee"]) == expected
    runners, _ = fake_trt_runners(art, sizing.Limits(max_context=1024, max_image_patches=2048))
    with Swapped(standard_pipeline, runners["vision"], runners["decoder"]):
        assert _chat(standard_pipeline, photos["coffee"]) == expected
