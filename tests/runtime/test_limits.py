"""runtime/limits.py: thread counts are bounded, and a bad one is one sentence naming the option."""

from __future__ import annotations

import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.limits import max_threads, validate_threads
from tests.serve_helpers import one_sentence


def test_threads_are_bounded():
    assert validate_threads(0) == 0 and validate_threads(2) == 2
    assert validate_threads(max_threads()) == max_threads() and max_threads() >= 64
    for bad in (-1, max_threads() + 1, 10_000, 1.5, "4", True, None):
        with pytest.raises(EdgevlError) as e:
            validate_threads(bad, name="--threads")
        assert str(e.value).startswith("--threads must be a whole number from 0 to ") and one_sentence(str(e.value))
