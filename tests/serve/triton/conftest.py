"""The fixtures `edgevl triton`'s tests share: a repository with a decoupled and a unary model, and `edgevl run`'s
answers to the prompts the tests send."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.serve.triton import edgevl


@pytest.fixture(scope="module")
def reference(tiny_artifact, photos):
    """`edgevl run --greedy --json` for the prompts the tests send."""
    def run(*extra):
        code, out, err = edgevl("run", tiny_artifact, "--max-new-tokens", "12", "--greedy", "--json", *extra)
        assert code == 0, err
        return json.loads(out)
    return {"text": run("--prompt", "Hello there"),
            "image": run("--prompt", "Describe the image.", "--image", photos["astronaut"])}


@pytest.fixture(scope="module")
def repo(tiny_artifact, tmp_path_factory) -> Path:
    """A decoupled model `tiny` (2 instances) and a unary model `tiny-unary` (copied artifact) in one repository
    (two `edgevl triton` runs)."""
    base = tmp_path_factory.mktemp("triton")
    code, _, err = edgevl("triton", tiny_artifact, "-o", base / "repo", "--model-name", "tiny", "--max-batch", "4",
                          "--instances", "2")
    assert code == 0, err
    code, _, err = edgevl("triton", tiny_artifact, "-o", base / "unary", "--model-name", "tiny-unary", "--unary",
                          "--copy", "--max-tokens", "12")
    assert code == 0, err
    shutil.move(base / "unary" / "tiny-unary", base / "repo" / "tiny-unary")
    return base / "repo"
