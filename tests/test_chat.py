"""Multi-turn chat: KV cache reuse gives the same tokens as re-running the whole conversation."""

from __future__ import annotations

import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.chat import ChatSession
from edgevl.runtime.prompt import user_message


def _fresh_run(pipeline, messages, images, **kwargs):
    row = pipeline.prepare_messages(messages, images)
    return pipeline.generate_prepared([row], **kwargs)[0]


def test_second_turn_reuses_cache_and_matches_a_fresh_run(pipeline, photos):
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
    assert chat.messages == [] and chat.cache is None
    again = chat.send("Hello!", max_new_tokens=6, do_sample=False)
    new = ChatSession(pipeline, system="You are terse.").send("Hello!", max_new_tokens=6, do_sample=False)
    assert (again.prompt_token_ids, again.token_ids) == (new.prompt_token_ids, new.token_ids)


def test_context_overflow_is_a_clear_error(pipeline, monkeypatch):
    chat = ChatSession(pipeline)
    monkeypatch.setattr(type(pipeline), "max_context", property(lambda self: 40))
    with pytest.raises(EdgevlError, match="/reset"):
        chat.send("word " * 60, max_new_tokens=4, do_sample=False)
