"""The model's chat template (jinja2), rendered with bounds: a template comes with a downloaded artifact.

transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment; so do we, with the same
filters and globals. The sandbox stops attribute access and mutation, not size or time, so a hostile
template could ask for `'A' * 10**9`, nested `range(99999)` loops or deep recursion. Here:

* size: string / list repetition, powers and the string methods that pad or repeat are checked before
  they run, and the rendered text stops at `max_chars` (it is checked chunk by chunk as it is produced);
* time: rendering runs under a trace hook that stops it after `max_seconds` (loops that print nothing
  are stopped too);
* everything else the template does wrong (syntax, recursion, undefined names, raise_exception) is
  one sentence, EdgevlError.
"""

from __future__ import annotations

import json
import operator
import sys
import time
from pathlib import Path

from jinja2 import meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgevl.errors import EdgevlError

MAX_TEMPLATE_BYTES = 1 << 20          # a chat template is a few KB
MAX_CHARS = 1 << 23                   # rendered text (8 Mi characters): far more than any context holds
MAX_SECONDS = 5.0
_PADDING_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs", "format", "join", "replace"}


class TemplateLimit(EdgevlError):
    """The chat template tried to produce too much or to run too long."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox transformers uses, with every size-amplifying operation checked before it runs."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int, **kwargs):
        super().__init__(**kwargs)
        self.max_chars = max_chars

    def call_binop(self, context, operator_name, left, right):
        if operator_name == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > self.max_chars:
                    raise TemplateLimit(f"the chat template tried to build a sequence of {len(seq) * times} items; "
                                        f"the limit is {self.max_chars}.")
            return operator.mul(left, right)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
            raise TemplateLimit("the chat template tried to compute a power too large to be a text length.")
        return operator.pow(left, right)

    def call(self, __context, __obj, *args, **kwargs):
        if getattr(__obj, "__name__", "") in _PADDING_METHODS and isinstance(getattr(__obj, "__self__", None), str):
            if any(isinstance(a, int) and a > self.max_chars for a in (*args, *kwargs.values())) or \
                    sum(len(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, list, tuple))) \
                    + len(__obj.__self__) > self.max_chars:
                raise TemplateLimit("the chat template tried to build a string past the length limit.")
        return super().call(__context, __obj, *args, **kwargs)


class _Deadline:
    """A trace hook that stops the code running under it once `seconds` have passed."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.ticks = 0

    def __call__(self, frame, event, arg):
        self.ticks += 1
        if self.ticks % 256 == 0 and time.perf_counter() > self.end:
            raise TemplateLimit("the chat template ran too long; it is not a usable chat template.")
        return self

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)
        return False


class ChatTemplate:
    """Renders messages with a Hugging Face chat template, in the same jinja environment transformers uses."""

    def __init__(self, source: str, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS):
        env = _BoundedEnvironment(max_chars, trim_blocks=True, lstrip_blocks=True,
                                  extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        self.max_chars, self.max_seconds = max_chars, max_seconds
        try:
            self.variables = frozenset(meta.find_undeclared_variables(env.parse(source)))
            self.template = env.from_string(source)
        except TemplateError as e:
            raise EdgevlError(f"the model's chat template is not valid jinja ({e}).") from None
        except RecursionError:
            raise EdgevlError("the model's chat template is nested too deeply to parse.") from None

    @classmethod
    def from_file(cls, path: Path) -> "ChatTemplate":
        path = Path(path)
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise EdgevlError(f"{path} is larger than {MAX_TEMPLATE_BYTES} bytes; it is not a chat template.")
        try:
            return cls(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise EdgevlError(f"{path} is not UTF-8 text.") from None

    def takes(self, name: str) -> bool:
        """Whether the template reads the variable `name` (e.g. "tools": it can describe functions to the model)."""
        return name in self.variables

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; EdgevlError if the template fails, runs past its time or grows past max_chars."""
        chunks, size = [], 0
        try:
            with _Deadline(self.max_seconds):
                for chunk in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **kwargs):
                    size += len(chunk)
                    if size > self.max_chars:
                        raise TemplateLimit(f"the chat template produced more than {self.max_chars} characters.")
                    chunks.append(chunk)
        except TemplateLimit:
            raise
        except TemplateError as e:
            raise EdgevlError(f"the model's chat template rejected the messages: {e}") from None
        except RecursionError:
            raise EdgevlError("the model's chat template recursed too deeply.") from None
        except (OverflowError, MemoryError, TypeError, ValueError, AttributeError, KeyError, IndexError,
                ZeroDivisionError) as e:
            raise EdgevlError(f"the model's chat template failed ({type(e).__name__}: {e}).") from None
        return "".join(chunks)
