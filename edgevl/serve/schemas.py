"""Request/response bodies of the OpenAI chat-completions API (the subset edgevl serves).

Sampling values are checked by the runtime's own `validate_sampling` rules (`sampling_problem`), so the
server refuses exactly what `edgevl run`, `edgevl chat` and the Python API refuse, in the same words.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from edgevl.runtime.sampling import sampling_problem, show_value

MAX_STOP_STRINGS = 16

_SURROGATE = re.compile("[\ud800-\udfff]")


class FieldProblem(ValueError):
    """What is wrong with a field, to follow its name ("temperature must be ..."); the app turns it into
    one sentence that starts with the field's path."""


def _no_lone_surrogates(text: str) -> str:
    # JSON can spell a lone UTF-16 surrogate ("\ud800"), Python keeps it, and no tokenizer can encode it.
    found = _SURROGATE.search(text)
    if found:
        raise FieldProblem(f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}), which is not a "
                           f"Unicode character, so the tokenizer cannot encode it")
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class ImageURL(BaseModel):
    url: Text
    detail: str | None = None


class VideoURL(BaseModel):
    url: Text


class ContentPart(BaseModel):
    # video_url is not OpenAI's; it is the part vLLM accepts for Qwen2-VL video.
    type: Literal["text", "image_url", "video_url"]
    text: Text | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)

    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None    # bounds: the runtime's sampling rules (see _sampling below)
    top_p: float | None = None
    stop: Text | list[Text] | None = Field(default=None)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("temperature", "top_p", "seed", mode="before")
    @classmethod
    def _sampling(cls, value, info):
        """The shared rules, before pydantic's coercion: "0.5" or true is not a temperature anywhere."""
        if value is not None:
            problem = sampling_problem(info.field_name, value)
            if problem:
                raise FieldProblem(f"{problem}, got {show_value(value)}")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise FieldProblem(f"has {len(value)} strings; at most {MAX_STOP_STRINGS} are accepted")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> dict:
        """OpenAI knobs -> edgevl sampling options; unset knobs keep the model's generation_config."""
        opts: dict = {"seed": self.seed}
        if self.temperature == 0:
            opts["do_sample"] = False
        elif self.temperature is not None or self.top_p is not None:
            # OpenAI defaults for the knob not given, and no top-k (OpenAI has none): the model's
            # generation_config (Qwen2-VL: top_k=1, top_p=0.001) would otherwise make it greedy.
            opts.update(do_sample=True, top_k=0,
                        temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p)
        return opts
