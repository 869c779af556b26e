"""Every field of OpenAI's chat-completions request and what this server does with it: one table.

A field is either HONOURED (with what that means here; some take only part of OpenAI's values, the rest are
refused by name) or REFUSED (a 400 naming it, whatever its value but null). A field in neither is not
OpenAI's and is refused by name too. schemas.py declares exactly these fields; tests/serve/test_fields.py
checks this table against the OpenAI client's own list of request fields.
"""

from __future__ import annotations

HONOURED: dict[str, str] = {
    "model": "must name the model this server serves",
    "messages": "system / user / assistant / tool turns; text, image_url and video_url parts",
    "max_tokens": "most new tokens",
    "max_completion_tokens": "most new tokens (wins over max_tokens)",
    "temperature": "0..2, 0 = greedy",
    "top_p": "nucleus sampling",
    "seed": "a per-request random generator",
    "stop": "at most 16 non-empty stop strings, never part of the reply",
    "stream": "server-sent events",
    "stream_options": "include_usage: a last chunk with the usage and no choices",
    "n": "1 only (one choice per request)",
    "logprobs": "the chosen tokens' logprobs (the model's raw distribution)",
    "top_logprobs": "0..20 most likely tokens per position",
    "logit_bias": "-100..100 added to the logits of the given token ids",
    "frequency_penalty": "-2..2, times a token's count in the reply so far",
    "presence_penalty": "-2..2, once a token is in the reply",
    "response_format": "text, or json_object / json_schema by constrained decoding (llguidance)",
    "tools": "function tools, through the model's chat template (refused when it has no tool support)",
    "tool_choice": "none, auto, required or a named function (the last two by constrained decoding)",
    "parallel_tool_calls": "true: one or more calls; false: with tool_choice required or a named function only",
    "store": "false only: this server stores no completions",
    "service_tier": "auto or default: there is one tier",
    "modalities": '["text"] only',
    # No effect on the reply, by OpenAI's own definition of them:
    "user": "an end-user id for the caller's abuse monitoring; no effect on the reply",
    "safety_identifier": "an end-user id for the caller's abuse monitoring; no effect on the reply",
    "metadata": "tags for stored completions; nothing is stored, no effect on the reply",
    "prompt_cache_key": "a cache-routing hint; --prefix-cache matches prompts by their tokens and needs none",
}

REFUSED: dict[str, str] = {
    "audio": "audio output",
    "functions": "the deprecated functions API; send tools instead",
    "function_call": "the deprecated functions API; send tool_choice instead",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models",
    "verbosity": "reasoning models",
    "web_search_options": "web search",
    "moderation": "moderated completions",
    "prompt_cache_retention": "prompt cache retention policies",
    "prompt_cache_options": "prompt cache options",
}


def refusal(name: str) -> str:
    """What follows a refused field's name."""
    return f"is not supported by this server ({REFUSED[name]}); leave it out"
