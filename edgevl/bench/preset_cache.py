"""`edgevl bench --preset NAME`: a random-weight model of a real architecture, exported once and cached.

    ~/.cache/edgevl/presets/NAME/model/        write_random_model(preset=NAME, seed=0)
    ~/.cache/edgevl/presets/NAME/export-fp32/  export_model(model, dtype="fp32")

($EDGEVL_CACHE replaces ~/.cache/edgevl.) Both folders are reused when present: the
model folder is written to a temporary sibling and renamed at the end, the export is
staged by the exporter, so an interrupted build never leaves a half folder that would
be mistaken for a finished one. The export is reused only while the exporter's code is
the one that made it (`exporter_fingerprint`, stamped beside the folder): an edgevl
whose graphs changed exports again and removes the preset's other `export-*` /
`quantize-bench-*` folders, quantized from the stale graphs (the benchmark scripts
then quantize afresh). Random weights make the generated text meaningless, but every
matrix has the real shape, so latency and memory are real.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

from edgevl.artifact.folder import staged_folder
from edgevl.cache import cache_root
from edgevl.extras import requires

RANDOM_WEIGHTS_NOTE = ("random weights (preset {name}): the generated text is meaningless, the latency and "
                       "memory numbers are real")


def preset_dirs(name: str, dtype: str = "fp32") -> tuple[Path, Path]:
    base = cache_root() / "presets" / name
    return base / "model", base / f"export-{dtype}"


def exporter_fingerprint() -> str:
    """sha256 (16 hex digits) of the exporter's source files, edgevl/export/*.py: what decides the graphs."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent.parent / "export").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _stamp(export_dir: Path) -> Path:
    return export_dir.with_name(export_dir.name + ".exporter")


def _current(export_dir: Path) -> bool:
    stamp = _stamp(export_dir)
    return (export_dir / "manifest.json").exists() and stamp.is_file() and stamp.read_text().strip() == \
        exporter_fingerprint()


def _remove_derived(base: Path, keep: Path) -> list[str]:
    """Delete the preset's artifact folders, made from a stale export, except `keep` and any export that is
    current (another dtype's, stamped by this exporter); their names."""
    gone = []
    for folder in sorted(base.iterdir()):
        if (folder != keep and folder.is_dir() and folder.name.startswith(("export-", "quantize-bench-"))
                and not _current(folder)):
            shutil.rmtree(folder)
            _stamp(folder).unlink(missing_ok=True)
            gone.append(folder.name)
    return gone


def ensure_preset(name: str, dtype: str = "fp32", log: Callable[[str], None] = print) -> Path:
    """The export folder of preset `name`, built (model + export) on first use; its path."""
    with requires("export", "--preset (it builds and exports a model)"):
        from edgevl.synthetic.architectures import get_preset
        get_preset(name)  # EdgevlError naming the choices for an unknown name
        from edgevl.export.exporter import export_model
        from edgevl.synthetic.random_model import write_random_model
    model_dir, export_dir = preset_dirs(name, dtype)
    if _current(export_dir):
        return export_dir
    if (export_dir / "manifest.json").exists():
        gone = _remove_derived(export_dir.parent, keep=export_dir)
        log(f"the cached {name} export was made by other exporter code: exporting again"
            + (f" (removed {', '.join(gone)}, made from it)" if gone else ""))
    if not (model_dir / "config.json").exists():
        log(f"writing random-weight model {name} -> {model_dir} (once)")
        with staged_folder(model_dir, force=True) as tmp:
            write_random_model(tmp, preset=name, seed=0)
    log(f"exporting {name} ({dtype}) -> {export_dir} (once)")
    export_model(str(model_dir), export_dir, dtype=dtype, force=True, log=lambda msg: log(f"  {msg}"))
    _stamp(export_dir).write_text(exporter_fingerprint() + "\n")
    return export_dir
