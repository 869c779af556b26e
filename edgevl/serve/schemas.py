"""Request/response bodies of the OpenAI chat-completions API (the subset edgevl serves)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class VideoURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    # video_url is not OpenAI's; it is the part vLLM accepts for Qwen2-VL video.
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

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
