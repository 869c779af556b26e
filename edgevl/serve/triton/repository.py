"""`edgevl triton OUT -o REPO`: a Triton Inference Server model repository serving one artifact.

    REPO/
      NAME/
        config.pbtxt        the Python backend, inputs and outputs (protocol.py), the transaction policy
                            (decoupled = streaming), instance_group (count, KIND_CPU / KIND_GPU, gpus) and the
                            edgevl settings as `parameters` (artifact, backend, limits, python_path)
        1/
          model.py          edgevl/serve/triton/model.py, copied: puts edgevl on the stub's path, then
                            handler.EdgevlTritonModel does the work
          artifact/         only with --copy: the artifact's files, checked against its manifest after copying

Without --copy, the `artifact` parameter is the artifact's absolute path: mount it at the same path in a
container, or use --copy for a self-contained repository. Either way the runtime checks every sha256 when the
model loads (unless --no-verify), as `edgevl run` does. REPO is written into a hidden sibling folder and renamed
into place when complete (edgevl.artifact.folder.staged_folder).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgevl import __version__
from edgevl.artifact.folder import MANIFEST, check_output, load_artifact, staged_folder
from edgevl.errors import EdgevlError
from edgevl.serve.triton.protocol import OUTPUTS, TensorDecl, inputs

MODEL_FILE = Path(__file__).with_name("model.py")
VERSION = "1"
COPIED_ARTIFACT = "artifact"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CPU_BACKENDS = ("ort-cpu",)


def instance_kind(backend: str) -> str:
    """KIND_CPU for onnxruntime's CPU EP, KIND_GPU for the CUDA / TensorRT backends."""
    return "KIND_CPU" if backend in CPU_BACKENDS else "KIND_GPU"


@dataclass(frozen=True)
class ModelSpec:
    """One Triton model: its name, transaction policy, instances and edgevl parameters (strings)."""

    name: str
    backend: str = "ort-cpu"
    decoupled: bool = True
    instances: int = 1
    gpus: tuple[int, ...] = ()           # KIND_GPU: the GPUs each get `instances` instances (empty: every GPU)
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return instance_kind(self.backend)


def check_model_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise EdgevlError(f"{name!r} is not a usable Triton model name; use letters, digits, '_', '-' and '.' "
                          f"(starting with a letter or digit, at most 128), e.g. --model-name qwen2-vl.")
    return name


# ----------------------------------------------------------------------------- config.pbtxt
def quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes, backslashes and control characters escaped)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _tensor(decl: TensorDecl, indent: str) -> str:
    lines = [f"name: {quote(decl.name)}", f"data_type: {decl.dtype}", f"dims: [ {', '.join(map(str, decl.dims))} ]"]
    if decl.optional:
        lines.append("optional: true")
    inner = indent + "  "
    return f"{indent}{{\n" + "".join(f"{inner}{line}\n" for line in lines) + f"{indent}}}"


def render_config(spec: ModelSpec) -> str:
    """config.pbtxt for `spec` (Triton's ModelConfig in protobuf text format)."""
    group = [f"count: {spec.instances}", f"kind: {spec.kind}"]
    if spec.kind == "KIND_GPU" and spec.gpus:
        group.append(f"gpus: [ {', '.join(map(str, spec.gpus))} ]")
    policy = ("responses stream (text deltas, then a final one)" if spec.decoupled
              else "one response per request (HTTP /infer, KServe v2)")
    per_gpu = " per GPU" if spec.kind == "KIND_GPU" else ""
    text = [
        f"# Written by `edgevl triton` (edgevl {__version__}). Inputs, outputs and parameters: docs/triton.md.",
        f"name: {quote(spec.name)}",
        'backend: "python"',
        "max_batch_size: 0",
        "",
        f"# decoupled: {policy}",
        f"model_transaction_policy {{ decoupled: {'true' if spec.decoupled else 'false'} }}",
        "",
        "input [",
        ",\n".join(_tensor(t, "  ") for t in inputs(spec.decoupled)),
        "]",
        "output [",
        ",\n".join(_tensor(t, "  ") for t in OUTPUTS),
        "]",
        "",
        f"# {spec.backend}: {spec.instances} instance(s){per_gpu}, each a process with its own copy of the model",
        "instance_group [",
        "  {",
        *(f"    {line}" for line in group),
        "  }",
        "]",
        "",
    ]
    for key, value in spec.parameters.items():
        text.append(f"parameters {{ key: {quote(key)} value: {{ string_value: {quote(value)} }} }}")
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------- the repository
def write_repository(artifact: str | Path, out: str | Path, spec: ModelSpec, copy: bool = False, verify: bool = True,
                     force: bool = False, log=lambda msg: None) -> Path:
    """Write REPO (`out`) with one model serving `artifact`; returns the model folder.

    The artifact is opened (its sha256s checked unless verify=False) and its graphs matched to the backend
    before anything is written; a copied artifact is checked again where it lands."""
    from edgevl.runtime.backends.table import BACKENDS, Backend

    check_model_name(spec.name)
    source = Path(artifact).resolve()
    inputs = [("the artifact", Path(artifact))]
    target = check_output(Path(out), force, inputs, what="the repository")   # before any work
    loaded = load_artifact(source, verify=verify)
    if spec.backend not in BACKENDS:
        raise EdgevlError(f"unknown backend {spec.backend!r}; choose one of {', '.join(BACKENDS)}.")
    Backend(BACKENDS[spec.backend]).graphs(loaded)     # the artifact's variant runs on this backend
    with staged_folder(target, force=force, inputs=inputs) as tmp:
        model_dir = tmp / spec.name
        version = model_dir / VERSION
        version.mkdir(parents=True)
        shutil.copyfile(MODEL_FILE, version / "model.py")
        where = str(source)
        if copy:
            dest = version / COPIED_ARTIFACT
            names = [MANIFEST, *loaded.manifest.files]
            log(f"copying {len(names)} files of {source} -> {spec.name}/{VERSION}/{COPIED_ARTIFACT}")
            for name in names:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, dest / name)
            load_artifact(dest, verify=True)           # the copy is what the manifest says
            where = COPIED_ARTIFACT                    # relative: inside the version folder
        parameters = {"artifact": where, "verify": "true" if verify else "false", "backend": spec.backend,
                      **{k: v for k, v in spec.parameters.items() if k not in ("artifact", "verify", "backend")}}
        spec = ModelSpec(spec.name, spec.backend, spec.decoupled, spec.instances, spec.gpus, parameters)
        (model_dir / "config.pbtxt").write_text(render_config(spec), encoding="utf-8")
    return target / spec.name
