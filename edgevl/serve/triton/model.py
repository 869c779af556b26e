"""edgevl on Triton Inference Server's Python backend (written by `edgevl triton`; copied as is).

Every setting is in this model's config.pbtxt `parameters`; the work is done by the installed edgevl package
(edgevl/serve/triton/handler.py). Triton's Python backend runs this file in its stub process, whose Python
ignores PYTHONPATH, and imports numpy (for triton_python_backend_utils) right after this file, before
`initialize`. So when this file is imported, the environment holding edgevl and its runtime (numpy,
onnxruntime, tokenizers, pillow, jinja2) is put on sys.path from
  - the config.pbtxt parameter `python_path` (folders separated by ':', relative ones inside the model
    folder), read here from the file next to this folder, then
  - the environment variable EDGEVL_TRITON_PYTHONPATH (same form),
each added like a site-packages folder (its .pth files are read, so editable installs work) ahead of the
stub's own paths. An NGC container with edgevl pip-installed into its Python needs neither.
"""

import os
import re
import site
import sys

_MODEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PYTHON_PATH = re.compile(r'key\s*:\s*"python_path"\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"')


def python_path_parameter(config_text: str) -> str:
    """The `python_path` parameter's value in a config.pbtxt ("" when absent)."""
    found = _PYTHON_PATH.search(config_text)
    return re.sub(r"\\(.)", r"\1", found.group(1)) if found else ""


def add_paths(model_dir: str = _MODEL_DIR) -> list:
    """Put the configured folders first on sys.path; returns them."""
    try:
        with open(os.path.join(model_dir, "config.pbtxt"), encoding="utf-8") as f:
            listed = python_path_parameter(f.read())
    except OSError:
        listed = ""
    entries = listed.split(os.pathsep) + os.environ.get("EDGEVL_TRITON_PYTHONPATH", "").split(os.pathsep)
    folders = [p if os.path.isabs(p) else os.path.join(model_dir, p) for p in entries if p]
    for folder in reversed(folders):        # the first one listed ends up first
        before = list(sys.path)
        site.addsitedir(folder)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + [p for p in before if p != folder]
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return folders


def _missing(e: ImportError) -> ImportError:
    return ImportError(
        f"edgevl's Triton model cannot import {e.name or 'a module'} in Triton's Python backend (Python "
        f"{sys.version.split()[0]}, extra paths {_FOLDERS or 'none'}): install edgevl into that Python, or point "
        f"`edgevl triton --python-path` (the config.pbtxt parameter python_path) at an environment that has it.")


_FOLDERS = add_paths()
try:        # what the stub imports next (triton_python_backend_utils needs numpy): say what is missing
    import numpy  # noqa: F401

    import edgevl.serve.triton.handler  # noqa: F401
except ImportError as _e:
    raise _missing(_e) from _e


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from edgevl.serve.triton.handler import EdgevlTritonModel
        self.model = EdgevlTritonModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        model = getattr(self, "model", None)
        if model is not None:
            model.finalize()
