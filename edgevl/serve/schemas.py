"""Request/response bodies of the OpenAI chat-completions API (the subset edgevl serves).

Sampling values are checked by the runtime's own `validate_sampling` rules (`sampling_problem`), so the
server refuses exactly what `edgevl run`, `edgevl chat` and the Python API refuse, in the same words; roles, content
part types, text and stop strings follow the rules the Triton model shares (requests.py).
Every OpenAI request field is declared (fields.py says what each does); the refused ones and any field that is
not OpenAI's are a 400 naming them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from edgevl.runtime.logprobs import MAX_TOP_LOGPROBS
from edgevl.runtime.sampling import show_value
from edgevl.serve.fields import REFUSED, refusal
from edgevl.serve.requests import PART_TYPES, ROLES, sampling_value_problem, stop_problem, surrogate_problem


class FieldProblem(ValueError):
    """What is wrong with a field, to follow its name ("temperature must be ..."); the app turns it into
    one sentence that starts with the field's path (`field`: that path, for a check of several fields)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _no_lone_surrogates(text: str) -> str:
    problem = surrogate_problem(text)
    if problem:
        raise FieldProblem(problem)
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(Strict):
    url: Text
    # Images are processed at the model's own resolution (its max_pixels): OpenAI's "high"; "low" (a 512-pixel
    # thumbnail) is refused rather than ignored.
    detail: Literal["auto", "high"] | None = None


class VideoURL(Strict):
    url: Text


class ContentPart(Strict):
    type: Literal[PART_TYPES]    # video_url is not OpenAI's; it is the part vLLM accepts for Qwen2-VL video
    text: Text | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class CalledFunction(Strict):
    name: Text = Field(pattern=FUNCTION_NAME)
    arguments: Text                          # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: Text
    type: Literal["function"] = "function"
    function: CalledFunction


MESSAGE_REFUSALS = {"name": "the chat template has no participant names", "refusal": "a turn's refusal text",
                    "audio": "audio", "function_call": "the deprecated functions API; send tool_calls",
                    "annotations": "citations"}


class Message(Strict):
    role: Literal[(*ROLES, "tool")]
    content: Text | list[ContentPart] | None = None       # None: an assistant turn that only calls tools
    tool_calls: list[ToolCall] | None = None               # assistant turns
    tool_call_id: Text | None = None                       # tool turns
    # OpenAI message fields this server has no place for: null (what a client sends back from a reply) or absent.
    name: object = None
    refusal: object = None
    audio: object = None
    function_call: object = None
    annotations: object = None

    @field_validator("name", "refusal", "audio", "function_call", "annotations", mode="before")
    @classmethod
    def _unsupported(cls, value, info):
        if value is not None and value != []:
            raise FieldProblem(f"is not supported by this server ({MESSAGE_REFUSALS[info.field_name]}); leave it out")
        return value

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise FieldProblem("is required (only an assistant turn with tool_calls may leave it out)", "content")
        return self


class FunctionDef(Strict):
    name: Text = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict | None = None          # a JSON Schema of the arguments
    strict: StrictBool | None = None        # either way the arguments are constrained by it when the model must call


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: Text


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: Text = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    json_schema: dict | None = Field(default=None, alias="schema")   # None: any JSON value
    strict: StrictBool | None = None        # either way the reply is constrained to the schema


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise FieldProblem("must be given with type json_schema, and only with it", "json_schema")
        return self


class StreamOptions(Strict):
    include_usage: StrictBool = False
    include_obfuscation: Literal[False] = False   # no padding of events: this server adds none


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")    # a field that is not OpenAI's is refused by name (fields.py)

    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None    # bounds: the runtime's sampling rules (see _sampling below)
    top_p: float | None = None
    stop: Text | list[Text] | None = Field(default=None)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    # The fields added for the OpenAI surface take their JSON types only ("3" is not a number, "yes" no boolean).
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[int, StrictFloat] | None = None           # JSON object keys are strings: "123" is token 123
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2, le=2)
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    store: StrictBool | None = None
    service_tier: Text | None = None
    modalities: list[Text] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    metadata: dict[str, Text] | None = None
    prompt_cache_key: Text | None = None
    # fields.REFUSED: declared so that a value is refused by its name (null is the same as leaving it out)
    audio: object = None
    functions: object = None
    function_call: object = None
    prediction: object = None
    reasoning_effort: object = None
    verbosity: object = None
    web_search_options: object = None
    moderation: object = None
    prompt_cache_retention: object = None
    prompt_cache_options: object = None

    @field_validator(*REFUSED, mode="before")
    @classmethod
    def _refused(cls, value, info):
        if value is not None:
            raise FieldProblem(refusal(info.field_name))
        return value

    @field_validator("store", "service_tier", "modalities")
    @classmethod
    def _one_value(cls, value, info):
        """Fields of which this server does one thing: that value (or null) is taken, any other refused."""
        ok = {"store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],)}[info.field_name]
        if value is not None and value not in ok:
            said = {"store": "false (this server stores no completions)", "service_tier": "auto or default (there "
                    "is one tier)", "modalities": '["text"] (the reply is text)'}[info.field_name]
            raise FieldProblem(f"can only be {said}, got {show_value(value)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value):
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise FieldProblem(f"must map token ids to numbers from -100 to 100, got {show_value(bias)} for "
                                   f"token {token}")
        return value

    @model_validator(mode="after")
    def _together(self):
        """Fields that only mean something with another one (OpenAI answers these with a 400 too)."""
        if self.stream_options is not None and not self.stream:
            raise FieldProblem("is only allowed when stream is true", "stream_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldProblem("needs logprobs: true", "top_logprobs")
        if not self.tools and (self.tool_choice is not None or "parallel_tool_calls" in self.model_fields_set):
            field = "tool_choice" if self.tool_choice is not None else "parallel_tool_calls"
            raise FieldProblem("is only allowed when tools are given", field)
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise FieldProblem(f"names the function '{self.tool_choice.function.name}', which is not in tools",
                               "tool_choice.function.name")
        return self

    @field_validator("temperature", "top_p", "seed", mode="before")
    @classmethod
    def _sampling(cls, value, info):
        """The shared rules, before pydantic's coercion: "0.5" or true is not a temperature anywhere."""
        problem = None if value is None else sampling_value_problem(info.field_name, value)
        if problem:
            raise FieldProblem(problem)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        problem = None if value is None else stop_problem([value] if isinstance(value, str) else value)
        if problem:
            raise FieldProblem(problem)
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
