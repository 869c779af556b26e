"""Bounds on runtime settings that are not sampling values (those are in `sampling.validate_sampling`)."""

from __future__ import annotations

import numbers
import os

from edgevl.errors import EdgevlError
from edgevl.runtime.sampling import show_value


def max_threads() -> int:
    """The most CPU threads (--threads) we accept: 4 per core, at least 64. More only adds contention
    (512 threads on 2 cores ran 100x slower than 2) and thousands never finish starting."""
    return max(64, 4 * (os.cpu_count() or 1))


def validate_threads(n, name: str = "threads") -> int:
    """`n` if it is a valid thread count (0 = onnxruntime's default), else EdgevlError naming `name`
    (the CLI passes "--threads")."""
    limit = max_threads()
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 0 <= n <= limit:
        raise EdgevlError(f"{name} must be a whole number from 0 to {limit} on this machine "
                          f"(0 = onnxruntime's default), got {show_value(n)}.")
    return int(n)
