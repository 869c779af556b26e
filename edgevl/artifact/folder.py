"""The artifact folder on disk: reading it safely, writing it atomically, and the graphs in it.

    OUT/
      manifest.json            the contract (edgevl.artifact.manifest), written last
      vision.onnx (+ .data)    the vision encoder
      decoder.onnx (+ .data)   the decoder with its KV cache
      embed_tokens.npy         [vocab, hidden] token embedding table, gathered by the runtime
      tokenizer.json, chat_template.jinja, generation_config.json, preprocessor_config.json, config.json, ...

Reading (`load_artifact`): the manifest is validated field by field; every path it names must stay
inside the folder (no absolute paths, no `..`, no symlink that leaves it) and be a regular file;
every file the runtime opens must be listed with its sha256, and (unless `verify=False`) every listed
file must match it. A problem is one sentence (EdgevlError), never a traceback or a read elsewhere.

Writing (`staged_folder` + `write_manifest`): everything goes into a hidden sibling folder that is
renamed into place only when complete, so an interrupted write never leaves a half-valid folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from edgevl.artifact.manifest import GraphSpec, Manifest, ManifestError
from edgevl.artifact.model_config import ModelConfig
from edgevl.errors import EdgevlError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20     # a manifest is a few KB; a huge one is not an export
# A graph with more weight bytes than this keeps them in `<graph file>.data` beside it: onnxruntime
# memory-maps that file instead of parsing the weights out of the protobuf (2b-l4 int8 decoder, 422 MB:
# session creation 1.3-2.3 s -> 0.4-0.5 s on a 2-core EPYC).
EXTERNAL_DATA_MIN_BYTES = 64 << 20


# ----------------------------------------------------------------------------- paths and hashes
def inside(folder: Path, relative: str, what: str = "a file") -> Path:
    """`folder/relative` if it names a regular file inside `folder`; EdgevlError otherwise.

    Refused: absolute paths, `..` or empty components, backslashes, symlinks that resolve outside
    the folder, and anything that is not a regular file (devices, fifos, folders)."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or "\0" in relative
            or any(p in ("", ".", "..") for p in parts)):
        raise EdgevlError(f"the manifest names {what} {relative!r} that is not a plain path inside the artifact "
                          f"folder; the artifact is damaged or not safe to load.")
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise EdgevlError(f"the manifest names {what} {relative!r} that leads outside the artifact folder; "
                          f"the artifact is not safe to load.")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise EdgevlError(f"{folder / relative} is listed in the manifest but missing; the export is "
                          f"incomplete.") from None
    if not stat.S_ISREG(mode):
        raise EdgevlError(f"the manifest names {what} {relative!r} that is not a regular file.")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in the folder except the manifest, by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != MANIFEST}


def files_digest(hashes: dict[str, str], files: tuple[str, ...]) -> str:
    """One sha256 over some files' sha256s (a graph and its data): names engines in caches."""
    return hashlib.sha256("".join(f"{f}:{hashes[f]}\n" for f in sorted(files)).encode()).hexdigest()


# ----------------------------------------------------------------------------- writing
def _real_paths(path: Path) -> set[Path]:
    """Where `path` really is: itself with symlinks resolved, and for a folder also where its symlinked entries
    lead (a Hugging Face cache snapshot's files are links into its blobs folder)."""
    path = Path(path)
    found = {path.resolve()}
    if path.is_dir():
        found |= {entry.resolve() for entry in path.iterdir() if entry.is_symlink()}
    return found


def refuse_overlap(out: Path, inputs: Iterable[tuple[str, Path]], what: str = "the output") -> None:
    """EdgevlError when `out` is, contains or lies inside one of `inputs` ((description, path) pairs), comparing
    real paths: no command may delete or change what it reads, --force or not. `what` names the output."""
    target = Path(out).resolve()
    for description, path in inputs:
        for real in sorted(_real_paths(path)):
            if target == real:
                relation = "is"
            elif real in target.parents:
                relation = "is inside"
            elif target in real.parents:
                relation = "contains"
            else:
                continue
            seen = "" if real == Path(path).resolve() else f" ({real} is part of it)"
            raise EdgevlError(f"{what} {target} {relation} {description} {path}{seen}; a command never replaces or "
                              f"writes into what it reads, so choose a path outside it.")


def check_output(out: Path, force: bool, inputs: Iterable[tuple[str, Path]] = (), what: str = "the output") -> Path:
    """The checks a writer makes before any work: `out` overlaps none of its inputs, and exists only with
    `force`. Returns `out` resolved."""
    refuse_overlap(out, inputs, what)
    out = Path(out).resolve()
    if (out.exists() or out.is_symlink()) and not force:
        raise EdgevlError(f"{out} already exists; pass --force to replace it.")
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def os_reason(e: OSError) -> str:
    """An OSError in words: its reason and the file it was about."""
    reason = e.strerror or str(e) or type(e).__name__
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)     # a copy or rename names both ends
    return f"{reason} ({files})" if files else reason


@contextmanager
def staged_folder(out: Path, force: bool = False, inputs: Iterable[tuple[str, Path]] = ()):
    """Yield a temporary sibling folder; move it to `out` only if the block succeeds.

    An interrupted or failed write never leaves a half-valid `out`. With `force`, an existing `out` (a folder
    or a file) is replaced after the new one is complete; an `out` that overlaps one of `inputs` is refused
    (check_output). An OSError while writing (a full disk, a read-only or forbidden folder) is one sentence
    naming `out` and the reason, with nothing left behind.
    """
    out = check_output(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise EdgevlError(f"{out} could not be written: {os_reason(e)}.") from None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact folder is an ordinary folder
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)       # the previous `out` stays as it was
                raise
            _remove(old)
        else:
            tmp.rename(out)
    except OSError as e:
        raise EdgevlError(f"{out} could not be written: {os_reason(e)}; no partial output was left.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Finalise a staged folder: hash every file, then write manifest.json last. Returns what was written."""
    manifest = replace(manifest, files=hash_files(folder))
    Manifest.from_json(json.loads(json.dumps(manifest.to_json())))   # never write what we could not read back
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class GraphFile:
    """A graph ready for a backend: its description, where it is, the model it belongs to, its digest.

    Backends build runners from this (never from a path plus a re-read manifest), so a graph outside
    any artifact (a candidate in `edgevl quantize`'s work folder) runs on every backend too.
    """

    spec: GraphSpec
    path: Path                    # the graph file; spec.data_files lie beside it
    config: ModelConfig
    digest: str                   # sha256 over the graph's files' sha256s

    @classmethod
    def standalone(cls, path: Path, spec: GraphSpec, config: ModelConfig) -> "GraphFile":
        """A graph file outside an artifact: its files hashed here."""
        path = Path(path)
        if path.name != spec.file:
            raise ValueError(f"{path} is described as {spec.file}")
        hashes = {f: sha256_file(path.parent / f) for f in spec.files}
        return cls(spec, path, config, files_digest(hashes, spec.files))

    @property
    def name(self) -> str:
        return Path(self.spec.file).stem


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file holding an object, as a dict, or one sentence saying what is wrong with it (`what` it is)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgevlError(f"{path} is not valid JSON ({type(e).__name__}); the {what} cannot be read.") from None
    if not isinstance(data, dict):
        raise EdgevlError(f"{path} must hold a JSON object (the {what}).")
    return data


@dataclass(frozen=True)
class Artifact:
    """A checked artifact folder: its path and typed manifest."""

    path: Path
    manifest: Manifest

    @property
    def config(self) -> ModelConfig:
        return self.manifest.config

    def file(self, name: str) -> Path:
        """A file the manifest lists, resolved inside the folder."""
        if name not in self.manifest.files:
            raise EdgevlError(f"{self.path} has no {name} listed in its manifest.")
        return inside(self.path, name)

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def read_json(self, name: str, max_bytes: int = 1 << 20) -> dict:
        """A small JSON side file the manifest lists ({} when it lists none); one sentence when it is bad."""
        if not self.has(name):
            return {}
        path = self.file(name)
        if path.stat().st_size > max_bytes:
            raise EdgevlError(f"{path} is larger than {max_bytes} bytes; it is not a model's {name}.")
        return read_json_object(path, f"model's {name}")

    def graph(self, kind: str, variant: str | None = None) -> GraphFile:
        spec = self.manifest.graph(kind, variant)
        return GraphFile(spec, inside(self.path, spec.file, "a graph"), self.config,
                         files_digest(self.manifest.files, spec.files))

    def graph_path(self, kind: str, variant: str | None = None) -> Path:
        return self.graph(kind, variant).path


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise EdgevlError(f"{folder} is not a folder; pass the output folder of `edgevl export`.")
    if not path.is_file():
        raise EdgevlError(f"{folder} has no {MANIFEST}; it is not an edgevl export.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgevlError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not an edgevl manifest.")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise EdgevlError(f"{path} is not UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise EdgevlError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except RecursionError:
        raise EdgevlError(f"{path} is nested too deeply to be an edgevl manifest.") from None
    try:
        return Manifest.from_json(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def load_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open an artifact folder: validate its manifest, confine its paths, and (by default) check every sha256."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for name in manifest.referenced_files():
        if name not in manifest.files:
            raise EdgevlError(f"{folder / MANIFEST} does not list {name} among its hashed files; the artifact is "
                              f"incomplete or was edited.")
    resolved = {name: inside(folder, name) for name in manifest.files}
    if verify:
        for name, file in resolved.items():
            if sha256_file(file) != manifest.files[name]:
                raise EdgevlError(f"{folder / name} does not match the sha256 in the manifest; the file was changed "
                                  f"or corrupted (re-export, or pass --no-verify to skip the check).")
    return Artifact(folder, manifest)
