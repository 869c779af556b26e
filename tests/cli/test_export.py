"""`edgevl export`'s bad input: a model type it does not take and a model it cannot download are one sentence, exit 2,
and nothing written."""

from __future__ import annotations

import json
import os

from tests.cli import assert_one_sentence_error, edgevl


def test_export_unknown_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_sentence_error(edgevl("export", tmp_path / "m", "-o", tmp_path / "out"), "llama")
    assert not (tmp_path / "out").exists()


def test_export_missing_model_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = edgevl("export", "no-such-org/no-such-model", "-o", tmp_path / "out", env=env)
    assert_one_sentence_error(proc, "no-such-org/no-such-model")
