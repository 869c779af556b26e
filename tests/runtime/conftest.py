"""Fixtures the runtime's tests share (the session-wide ones are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from edgevl.artifact.folder import load_artifact


@pytest.fixture(scope="module")
def art(tiny_artifact_standard):
    """The standard-op artifact: the graphs the TensorRT backends run."""
    return load_artifact(tiny_artifact_standard, verify=False)
