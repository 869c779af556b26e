"""Fixtures the server's tests share (the session-wide ones are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def base(pipeline):
    """`edgevl serve` on the tiny model, on a loopback port: its base URL (one server per test module)."""
    from tests.openai_requests import server_for
    with server_for(pipeline) as url:
        yield url
