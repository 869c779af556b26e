"""The artifact contract: a manifest is validated field by field, its paths stay inside the folder, every file
the runtime opens is hashed, and a bad one is one sentence (exit 2) — never a traceback or a read elsewhere."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.artifact import FORMAT_VERSION, Manifest, ManifestError, load_artifact
from edgevl.artifact.folder import MANIFEST, write_manifest
from edgevl.errors import EdgevlError


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    """A private copy of the tiny artifact, and a function that edits its manifest.json."""
    folder = tmp_path / "art"
    shutil.copytree(tiny_artifact, folder)

    def edit(change):
        data = json.loads((folder / MANIFEST).read_text())
        change(data)
        (folder / MANIFEST).write_text(json.dumps(data))
        return folder
    return folder, edit


def _set(path: str, value):
    """A change that sets manifest[path] ('/'-separated, list indices as numbers) to value, or deletes it for ..."""
    def change(data):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parents:
            data = data[p]
        if value is ...:
            del data[last]
        else:
            data[last] = value
    return change


MALFORMED = [
    ("config/hidden_size", ..., "'config.hidden_size' is missing"),
    ("config/hidden_size", "64", "'config.hidden_size' must be an integer"),
    ("config/num_hidden_layers", 0, "'config.num_hidden_layers' is 0; it must be at least 1"),
    ("config/rope_theta", "NaN", "'config.rope_theta' must be a finite number"),
    ("config/eos_token_id", [], "'config.eos_token_id' is empty"),
    ("config/mrope_section", [1, 1, 1], "'config.mrope_section' does not add up"),
    ("graphs/decoder/inputs/0/dtype", 5, "'graphs.decoder.inputs[0].dtype' must be a non-empty string"),
    ("graphs/decoder/inputs/0/dtype", "complex128", "'graphs.decoder.inputs[0].dtype' is 'complex128'"),
    ("graphs/decoder/inputs/1/shape", "3xBxS", "'graphs.decoder.inputs[1].shape' must be a list"),
    ("graphs/decoder/inputs/1/shape", [3, -1], "'graphs.decoder.inputs[1].shape[1]' must be a size"),
    ("graphs/decoder/kind", "encoder", "'graphs.decoder.kind' is 'encoder'"),
    ("graphs/vision/precision", "int3", "'graphs.vision.precision' is 'int3'"),
    ("graphs/vision/custom_ops", "edgevl.MRoPE", "'graphs.vision.custom_ops' must be a list"),
    ("graphs/vision", ..., "has no vision graph"),
    ("graphs", [], "'graphs' must be an object"),
    ("embeddings/weight/shape", [2014], "'embeddings.weight.shape' must be [vocab, hidden]"),
    ("embeddings/hidden", 63, "'embeddings.weight.shape' must be [vocab, hidden]"),
    ("embeddings/encoding", "sparse", "'embeddings.encoding' is 'sparse'"),
    ("embeddings/weight/offset", -1, "'embeddings.weight.offset' is -1"),
    ("embeddings/weight/file", "../x.npy", "does not list ../x.npy"),
    ("image_processor/min_pixels", "many", "'image_processor' is not valid"),
    ("files/tokenizer.json", "abc", "'files.tokenizer.json' must be a sha256 hex digest"),
    ("source_model", ..., "'source_model' is missing"),
    ("dtype", "int8", "'dtype' is 'int8'"),
    ("quantization", {"recipe": 3}, "'quantization.recipe' must be a non-empty string"),
    ("format_version", 1, "format version 1; this edgevl reads version"),
    ("format", "onnx", "not an edgevl manifest"),
]


@pytest.mark.parametrize("field,value,message", MALFORMED, ids=[f"{m[0]}={m[1]!r}"[:40] for m in MALFORMED])
def test_each_malformed_field_is_one_sentence_naming_it(copy, field, value, message):
    folder, edit = copy
    edit(_set(field, value))
    with pytest.raises(EdgevlError) as err:
        load_artifact(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe not utf-8", b"{" * 100_000, b"null", b'{"format": 1}'])
def test_a_manifest_that_is_not_an_object_is_one_sentence(copy, content):
    folder, _ = copy
    (folder / MANIFEST).write_bytes(content)
    with pytest.raises(EdgevlError):
        load_artifact(folder)


def test_a_huge_manifest_is_refused_before_it_is_read(copy):
    folder, _ = copy
    with open(folder / MANIFEST, "wb") as f:
        f.truncate(64 << 20)                                    # sparse: 64 MiB of zeros
    with pytest.raises(EdgevlError, match="larger than 16 MiB"):
        load_artifact(folder)


def test_the_cli_exits_2_with_one_line_and_no_traceback(copy):
    folder, edit = copy
    edit(_set("graphs/decoder/inputs/0/dtype", 5))
    proc = subprocess.run([sys.executable, "-m", "edgevl", "run", str(folder), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "graphs.decoder.inputs[0].dtype" in proc.stderr


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "/dev/zero", "a/../../outside.txt", "./vision.onnx",
                                  "", "sub\\..\\x", "vision.onnx/"])
def test_paths_that_leave_the_folder_are_refused(copy, name):
    folder, edit = copy
    (folder.parent / "outside.txt").write_text("secret")
    edit(lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(EdgevlError, match="not a plain path inside|leads outside"):
        load_artifact(folder, verify=False)


def test_a_graph_file_outside_the_folder_is_refused(copy):
    folder, edit = copy
    edit(lambda m: m["graphs"]["vision"].update(file="../vision.onnx"))
    with pytest.raises(EdgevlError):
        load_artifact(folder, verify=False)


def test_symlinks_out_of_the_folder_and_special_files_are_refused(copy, tmp_path):
    folder, edit = copy
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", folder / "link.json")
    edit(lambda m: m["files"].update({"link.json": "0" * 64}))
    with pytest.raises(EdgevlError, match="leads outside"):
        load_artifact(folder, verify=False)
    (folder / "link.json").unlink()
    os.symlink("/dev/zero", folder / "link.json")
    with pytest.raises(EdgevlError, match="leads outside"):
        load_artifact(folder, verify=False)
    (folder / "link.json").unlink()
    os.mkfifo(folder / "link.json")                            # opening it for reading would hang
    with pytest.raises(EdgevlError, match="not a regular file"):
        load_artifact(folder)
    (folder / "link.json").unlink()
    os.symlink("vision.onnx", folder / "link.json")            # a link that stays inside is fine
    edit(lambda m: m["files"].update({"link.json": m["files"]["vision.onnx"]}))
    load_artifact(folder)


def test_nothing_outside_the_folder_is_opened(copy, tmp_path):
    """A fifo outside the folder, named by the manifest: any read of it would block the child for good."""
    folder, edit = copy
    os.mkfifo(tmp_path / "trap")
    os.symlink(tmp_path / "trap", folder / "trap-link")
    for name, message in (("../trap", "not a plain path inside"), ("trap-link", "leads outside the artifact folder")):
        edit(lambda m: m["files"].update({name: "0" * 64}))
        code = f"from edgevl.artifact import load_artifact\nload_artifact({str(folder)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and message in proc.stderr
        edit(lambda m: m["files"].pop(name))


def test_every_file_the_runtime_opens_must_be_listed(copy):
    folder, edit = copy
    edit(lambda m: m.update(files={}))
    with pytest.raises(EdgevlError, match="does not list vision.onnx among its hashed files"):
        load_artifact(folder, verify=False)


def test_a_changed_file_fails_the_hash_check(copy):
    folder, _ = copy
    with open(folder / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(EdgevlError, match="does not match the sha256"):
        load_artifact(folder)
    load_artifact(folder, verify=False)                       # --no-verify skips only the hashes


def test_side_files_not_listed_are_never_read(copy):
    """generation_config.json is opened only when the manifest lists (and hashes) it."""
    folder, edit = copy
    (folder / "generation_config.json").write_text("not json at all")
    edit(lambda m: m["files"].pop("generation_config.json"))
    art = load_artifact(folder)
    assert art.read_json("generation_config.json") == {}


# ----------------------------------------------------------------------------- round trip
def test_the_manifest_round_trips_and_is_typed(tiny_artifact, tmp_path):
    art = load_artifact(tiny_artifact)
    m = art.manifest
    assert m.format_version == FORMAT_VERSION and m.config.num_hidden_layers >= 1
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    decoder = m.graph("decoder")
    assert decoder.custom_ops == ("edgevl.MRoPE",) and decoder.files == ("decoder.onnx",)
    assert decoder.input("inputs_embeds").shape[-1] == m.config.hidden_size
    with pytest.raises(ManifestError, match="no decoder graph of the 'standard' variant"):
        m.graph("decoder", "standard")
    # a derived manifest (what quantize does) is written with fresh hashes and checked on the way out
    folder = tmp_path / "copy"
    shutil.copytree(tiny_artifact, folder)
    written = write_manifest(folder, dataclasses.replace(m, versions={**m.versions, "note": "derived"}))
    assert load_artifact(folder).manifest == written and written.versions["note"] == "derived"
    with pytest.raises(ManifestError):
        write_manifest(folder, dataclasses.replace(m, graphs={}))
    assert Path(folder / MANIFEST).exists()


def test_kv_cache_bytes(tiny_artifact):
    import dataclasses

    from edgevl.artifact import load_artifact
    # Qwen2-VL-2B at 1000 tokens of context, fp32: 28 layers x K and V x 2 heads x 128 dims x 4 bytes per token.
    config = dataclasses.replace(load_artifact(tiny_artifact).config, num_hidden_layers=28, num_key_value_heads=2,
                                 head_dim=128)
    assert config.kv_cache_bytes(1, 1000, 4) == 2 * 28 * 2 * 128 * 1000 * 4
    assert config.kv_cache_bytes(3, 1000, 4) == 3 * config.kv_cache_bytes(1, 1000, 4)


def test_int8_prefill_is_written_only_when_set_and_only_for_4bit_decoders(tiny_artifact):
    m = load_artifact(tiny_artifact).manifest
    decoder = m.to_json()["graphs"]["decoder"]
    assert "int8_prefill" not in decoder                     # older manifests and float graphs stay as they were
    marked = {**decoder, "precision": "int4", "int8_prefill": True}
    again = Manifest.from_json({**m.to_json(), "graphs": {**m.to_json()["graphs"], "decoder": marked}})
    assert again.graph("decoder").int8_prefill and again.to_json()["graphs"]["decoder"]["int8_prefill"] is True
    for bad in ({**decoder, "int8_prefill": True}, {**m.to_json()["graphs"]["vision"], "int8_prefill": True}):
        graphs = {**m.to_json()["graphs"], bad["kind"]: bad}
        with pytest.raises(ManifestError, match="int8_prefill' is for 4-bit decoders only"):
            Manifest.from_json({**m.to_json(), "graphs": graphs})
