"""`edgevl bench --preset NAME`: a random-weight model of a real architecture, exported once and cached.

    ~/.cache/edgevl/presets/NAME/model/        write_random_model(preset=NAME, seed=0)
    ~/.cache/edgevl/presets/NAME/export-fp32/  export_model(model, dtype="fp32")

($EDGEVL_CACHE replaces ~/.cache/edgevl.) Both folders are reused when present: the
model folder is written to a temporary sibling and renamed at the end, the export is
staged by the exporter, so an interrupted build never leaves a half folder that would
be mistaken for a finished one. Random weights make the generated text meaningless,
but every matrix has the real shape, so latency and memory are real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgevl.errors import EdgevlError

RANDOM_WEIGHTS_NOTE = ("random weights (preset {name}): the generated text is meaningless, the latency and "
                       "memory numbers are real")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVL_CACHE") or Path.home() / ".cache" / "edgevl")


def preset_dirs(name: str, dtype: str = "fp32") -> tuple[Path, Path]:
    base = cache_root() / "presets" / name
    return base / "model", base / f"export-{dtype}"


def ensure_preset(name: str, dtype: str = "fp32", log: Callable[[str], None] = print) -> Path:
    """The export folder of preset `name`, built (model + export) on first use; its path."""
    try:
        from edgevl.export.presets import get_preset
        get_preset(name)  # EdgevlError naming the choices for an unknown name
        from edgevl.export.exporter import export_model
        from edgevl.export.tiny_model import write_random_model
    except ImportError as e:
        raise EdgevlError(f"--preset builds and exports a model, which needs the export extra ({e.name} is "
                          f"missing); install it with `pip install 'edgevl[export]'`.") from None
    model_dir, export_dir = preset_dirs(name, dtype)
    if (export_dir / "manifest.json").exists():
        return export_dir
    if not (model_dir / "config.json").exists():
        log(f"writing random-weight model {name} -> {model_dir} (once)")
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.partial-", dir=model_dir.parent))
        try:
            write_random_model(tmp, preset=name, seed=0)
            if model_dir.exists():
                shutil.rmtree(model_dir)
            tmp.rename(model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"exporting {name} ({dtype}) -> {export_dir} (once)")
    export_model(str(model_dir), export_dir, dtype=dtype, force=True, log=lambda msg: log(f"  {msg}"))
    return export_dir
