"""Typed reads from the manifest's JSON: each read checks one field and names it when it is wrong.

`Fields` wraps one JSON object at a dotted path (`graphs.decoder.inputs[2]`); `str`, `int`, `float`,
`bool`, `ints`, `strs`, `list`, `obj`, `json` return the field's value or raise `ManifestError` with one
sentence naming the field and what it should be. `manifest.py` builds its dataclasses from them.
"""

from __future__ import annotations

import math
from typing import Any

from edgevl.errors import EdgevlError


class ManifestError(EdgevlError):
    """A manifest field is missing, has the wrong type or an impossible value."""


class Fields:
    """Typed reads from one JSON object of the manifest; every error names the field's path."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ManifestError(f"manifest field '{where}' must be an object, not {_kind(data)}.")
        self.data, self.where = data, where

    def path(self, key) -> str:
        return f"{self.where}.{key}" if self.where else str(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default=...):
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise ManifestError(f"manifest field '{self.path(key)}' is missing.")
            return default
        return self.data[key]

    def str(self, key: str, default=..., choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check(isinstance(value, str) and value != "", self.path(key), "a non-empty string", value)
        if choices and value not in choices:
            raise ManifestError(f"manifest field '{self.path(key)}' is {value!r}; expected one of "
                                f"{', '.join(choices)}.")
        return value

    def int(self, key: str, default=..., minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check(is_int(value), self.path(key), "an integer", value)
        if minimum is not None and value < minimum:
            raise ManifestError(f"manifest field '{self.path(key)}' is {value}; it must be at least {minimum}.")
        return value

    def float(self, key: str, default=...) -> float:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check((is_int(value) or isinstance(value, float)) and math.isfinite(value), self.path(key),
               "a finite number", value)
        return float(value)

    def bool(self, key: str, default=...) -> bool:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check(isinstance(value, bool), self.path(key), "true or false", value)
        return value

    def ints(self, key: str, default=..., minimum: int | None = None) -> tuple[int, ...]:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check(isinstance(value, list) and all(is_int(v) for v in value), self.path(key), "a list of integers",
               value)
        if minimum is not None and any(v < minimum for v in value):
            raise ManifestError(f"manifest field '{self.path(key)}' holds a value below {minimum}.")
        return tuple(value)

    def strs(self, key: str, default=...) -> tuple[str, ...]:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        check(isinstance(value, list) and all(isinstance(v, str) and v for v in value), self.path(key),
               "a list of non-empty strings", value)
        return tuple(value)

    def list(self, key: str) -> list:
        value = self.raw(key)
        check(isinstance(value, list), self.path(key), "a list", value)
        return value

    def obj(self, key: str, default=...) -> "Fields":
        value = self.raw(key, {} if default is not ... else ...)
        return Fields(value, self.path(key))

    def json(self, key: str) -> dict:
        """A free-form object (informational; its contents are not part of the contract)."""
        return dict(self.obj(key, default={}).data)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check(ok: bool, where: str, expected: str, value) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else _kind(value)
        raise ManifestError(f"manifest field '{where}' must be {expected}, not {shown}.")
