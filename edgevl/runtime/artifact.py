"""The artifact folder an export writes and the runtime reads, and its `manifest.json`.

    OUT/
      manifest.json          format version, source model, model facts, graphs' I/O, file hashes
      vision.onnx            pixel_values [N, C*T*P*P], rotary_pos_ids [N, 2] -> image_embeds [N/4, H]
      decoder.onnx (+ .data) inputs_embeds, position_ids [3,B,S], attention_mask, past KV -> logits, present KV
      embed_tokens.npy       [vocab, H] token embedding table, gathered by the runtime
      tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json,
      preprocessor_config.json, config.json   copied from the source model

Everything here is plain JSON/numpy: this module is shared by the exporter (which
writes) and the torch-free runtime (which reads and verifies).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import EdgevlError

FORMAT = "edgevl-artifact"
FORMAT_VERSION = 1
# A graph with more weight bytes than this keeps them in `<graph file>.data` beside it: onnxruntime
# memory-maps that file instead of parsing the weights out of the protobuf (2b-l4 int8 decoder, 422 MB:
# session creation 1.3-2.3 s -> 0.4-0.5 s on a 2-core EPYC), and one protobuf cannot exceed 2 GB.
EXTERNAL_DATA_MIN_BYTES = 64 << 20
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in the folder except the manifest, by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


@contextmanager
def staged_folder(out: Path, force: bool = False):
    """Yield a temporary sibling folder; move it to `out` only if the block succeeds.

    An interrupted or failed write never leaves a half-valid `out`. With `force`,
    an existing `out` is replaced (after the new one is complete).
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise EdgevlError(f"{out} already exists; pass --force to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact folder is an ordinary folder
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Finalise a staged folder: hash every file, then write manifest.json last."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": hash_files(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder: its path and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    def graph_path(self, name: str) -> Path:
        return self.path / self.manifest["graphs"][name]["file"]

    def file(self, name: str) -> Path:
        return self.path / name

    def read_json(self, name: str) -> dict:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else {}


def load_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open an export folder, checking its format version and (by default) every file's sha256."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise EdgevlError(f"{folder} is not a folder; pass the output folder of `edgevl export`.")
    if not manifest_path.exists():
        raise EdgevlError(f"{folder} has no {MANIFEST}; it is not an edgevl export.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise EdgevlError(f"{manifest_path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    if manifest.get("format") != FORMAT:
        raise EdgevlError(f"{manifest_path} is not an edgevl manifest (format {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgevlError(f"{folder} has artifact format version {version}, this edgevl reads version "
                          f"{FORMAT_VERSION}; re-export the model with this edgevl.")
    for key in ("config", "graphs", "files"):
        if key not in manifest:
            raise EdgevlError(f"{manifest_path} has no '{key}' section; the export is incomplete.")
    if verify:
        verify_files(folder, manifest["files"])
    return Artifact(folder, manifest)


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    for name, digest in expected.items():
        path = folder / name
        if not path.exists():
            raise EdgevlError(f"{path} is listed in the manifest but missing; the export is incomplete.")
        if sha256_file(path) != digest:
            raise EdgevlError(f"{path} does not match the sha256 in the manifest; the file was changed "
                              f"or corrupted (re-export, or pass --no-verify to skip the check).")
