"""bench/preset_cache.py: a preset's model is built and exported once, then reused."""

from __future__ import annotations

import shutil

import pytest

from edgevl.errors import EdgevlError


def test_preset_is_built_once_and_reused(tiny_artifact, tmp_path, monkeypatch):
    import edgevl.export.exporter as exporter
    import edgevl.synthetic.random_model as tiny_model
    from edgevl.bench.preset_cache import ensure_preset
    calls = []

    def fake_model(out, preset, seed):
        calls.append(("model", preset))
        (out / "config.json").write_text("{}")

    def fake_export(model, out, dtype, force, log):
        calls.append(("export", dtype))
        shutil.rmtree(out, ignore_errors=True)                 # force=True
        shutil.copytree(tiny_artifact, out)
        return out

    monkeypatch.setenv("EDGEVL_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_model, "write_random_model", fake_model)
    monkeypatch.setattr(exporter, "export_model", fake_export)
    first = ensure_preset("tiny", log=lambda msg: None)
    assert first == tmp_path / "presets" / "tiny" / "export-fp32" and (first / "manifest.json").exists()
    assert (tmp_path / "presets" / "tiny" / "model" / "config.json").exists()
    assert ensure_preset("tiny", log=lambda msg: None) == first
    assert calls == [("model", "tiny"), ("export", "fp32")]    # the second call built nothing
    # An export made by other exporter code (another stamp, or none) is made again, and what was quantized
    # from it goes; other folders stay.
    quantized, images = first.parent / "export-w4a16", first.parent / "vision-scaling-images"
    shutil.copytree(first, quantized)
    images.mkdir()
    other_dtype = first.parent / "export-fp16"                 # another dtype's export, current: kept
    shutil.copytree(first, other_dtype)
    shutil.copy(first.parent / "export-fp32.exporter", first.parent / "export-fp16.exporter")
    (first.parent / "export-fp32.exporter").write_text("0123456789abcdef\n")
    said = []
    assert ensure_preset("tiny", log=said.append) == first and (first / "manifest.json").exists()
    assert calls[2:] == [("export", "fp32")] and not quantized.exists() and images.is_dir() and other_dtype.is_dir()
    assert said[0] == ("the cached tiny export was made by other exporter code: exporting again (removed "
                       "export-w4a16, made from it)")
    assert ensure_preset("tiny", log=lambda msg: None) == first and len(calls) == 3
    with pytest.raises(EdgevlError, match="unknown preset"):
        ensure_preset("qwen2-vl-1b", log=lambda msg: None)
