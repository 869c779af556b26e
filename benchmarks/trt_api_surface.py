"""Record the Python API surface of each TensorRT version edgevl supports into tests/data/trt_api/<version>.json.

    python benchmarks/trt_api_surface.py [--out tests/data/trt_api] [--keep DIR] [--ort-wheel WHL] [VERSION ...]

For each version it downloads the real bindings wheel from PyPI (`tensorrt-cu12-bindings` for 10.3, JetPack 6's
TensorRT; `tensorrt-cu13-bindings` for the rest; ~1.3 MB each, for this interpreter's Python), builds stand-in
libnvinfer / libnvonnxparser / libnvinfer_plugin shared objects with the system C compiler (the sonames the
bindings' tensorrt.so names in DT_NEEDED, exporting the C entry points it resolves: createInferBuilder_INTERNAL,
createNvOnnxParser_INTERNAL, ...), imports the bindings over them in a child process, and writes every module
name, every enum's members and every class's attributes.

Why recorded, not imported by the tests: CI must not download eight wheels per run (nor depend on PyPI being
up); the surface of a released version never changes, so it is recorded once. tests/runtime/backends/test_trt.py checks
trt.py against every recorded version, through tests/fake_trt.py, whose TensorRT exposes exactly a recorded
surface. Every version listed here imported over the stand-ins when this was written (none had to be left out).

--ort-wheel onnxruntime_gpu-1.31.1-*.whl (the one ../shared/device/ort-gpu-wheel.sh downloads) also records
what its provider libraries link and the TensorRT EP's option names, into tests/data/ort_gpu/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (PyPI package, version): JetPack 6.x has 10.3; JetPack 7.0/7.1 10.13; desktop 10.14 .. 10.16 and 11.x.
VERSIONS = [("tensorrt-cu12-bindings", "10.3.0"), ("tensorrt-cu13-bindings", "10.13.3.9"),
            ("tensorrt-cu13-bindings", "10.14.1.48.post1"), ("tensorrt-cu13-bindings", "10.15.1.29"),
            ("tensorrt-cu13-bindings", "10.16.1.11"), ("tensorrt-cu13-bindings", "11.0.0.114"),
            ("tensorrt-cu13-bindings", "11.2.1.2"), ("tensorrt-cu13-bindings", "11.4.0.106")]

STUBS = """
#include <stddef.h>
void *createInferBuilder_INTERNAL(void *l, int v) { return NULL; }
void *createInferRefitter_INTERNAL(void *e, void *l, int v) { return NULL; }
void *createInferRuntime_INTERNAL(void *l, int v) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *n, void *l, int v) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *r, void *l, int v) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int c) { return NULL; }
int initLibNvInferPlugins(void *l, const char *n) { return 1; }
int getInferLibVersion(void) { return 0; }
"""

DUMP = """
import json, sys
import tensorrt_bindings as trt
out = {"version": trt.__version__, "module": [], "enums": {}, "classes": {}}
for name in sorted(n for n in dir(trt) if not n.startswith("_")):
    out["module"].append(name)
    obj = getattr(trt, name)
    if not isinstance(obj, type):
        continue
    if isinstance(getattr(obj, "__members__", None), dict):
        out["enums"][name] = sorted(obj.__members__)
    else:
        out["classes"][name] = sorted(a for a in dir(obj) if not a.startswith("_"))
json.dump(out, sys.stdout, sort_keys=True)
"""


def log(msg: str) -> None:
    print(f"[trt_api_surface] {msg}", flush=True)


def download(package: str, version: str, dest: Path) -> Path:
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
                    "--python-version", py, "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64", f"{package}=={version}"], check=True)
    return next(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))


def stand_ins(sonames, folder: Path) -> None:
    """One stub object per soname, each exporting every entry point the bindings resolve."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("needs a C compiler (gcc or cc) for the stand-in libraries")
    source = folder / "stubs.c"
    source.write_text(STUBS)
    for soname in sonames:
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / soname), f"-Wl,-soname,{soname}",
                        str(source)], check=True)


def record(package: str, version: str, work: Path) -> dict:
    from edgevl.runtime.backends.elf import read_dynamic
    from edgevl.runtime.backends.probe import SYSTEM_LIBRARIES
    folder = work / version
    folder.mkdir(parents=True, exist_ok=True)
    wheel = download(package, version, folder)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder / "site")
    binding = folder / "site" / "tensorrt_bindings" / "tensorrt.so"
    needed = [n for n in read_dynamic(binding).needed if not n.startswith(SYSTEM_LIBRARIES)]
    stand_ins(needed, folder)
    env = {**os.environ, "LD_LIBRARY_PATH": str(folder), "PYTHONPATH": str(folder / "site")}
    proc = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, env=env, cwd=folder)
    if proc.returncode != 0:
        raise RuntimeError(f"{package} {version} did not import over the stand-ins: {proc.stderr.strip()[-400:]}")
    surface = json.loads(proc.stdout)
    surface.update(package=package, links=needed)
    return surface


def record_onnxruntime_gpu(wheel: Path, out: Path) -> Path:
    """From an onnxruntime-gpu wheel: its version, the libraries each provider library links (DT_NEEDED) and the
    TensorRT EP's option names (the trt_* strings of libonnxruntime_providers_tensorrt.so)."""
    import re

    from edgevl.runtime.backends.elf import read_dynamic
    with tempfile.TemporaryDirectory(prefix="edgevl-ort-gpu-") as tmp, zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")).split("-")[1].split(".dist")[0]
        links, options = {}, []
        for name in ("cuda", "tensorrt"):
            member = f"onnxruntime/capi/libonnxruntime_providers_{name}.so"
            path = Path(z.extract(member, tmp))
            links[name] = list(read_dynamic(path).needed)
            if name == "tensorrt":
                options = sorted(set(re.findall(rb"(?<![\w])(trt_[a-z0-9_]+)\x00", path.read_bytes())))
    record = {"onnxruntime_gpu": version, "links": links, "tensorrt_ep_options": [o.decode() for o in options]}
    path = out / f"onnxruntime-gpu-{version}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("versions", nargs="*", help="versions to record (default: all of VERSIONS)")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "trt_api")
    p.add_argument("--keep", type=Path, help="keep the wheels and stand-ins here (default: a temporary folder)")
    p.add_argument("--ort-wheel", type=Path, help="also record an onnxruntime-gpu wheel's provider libraries and "
                                                   "TensorRT EP options (into tests/data/ort_gpu/)")
    args = p.parse_args(argv)
    if args.ort_wheel:
        out = ROOT / "tests" / "data" / "ort_gpu"
        out.mkdir(parents=True, exist_ok=True)
        log(f"wrote {record_onnxruntime_gpu(args.ort_wheel, out)}")
    chosen = [(pkg, v) for pkg, v in VERSIONS if not args.versions or v in args.versions]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgevl-trt-api-"))
    failed = []
    try:
        for package, version in chosen:
            try:
                surface = record(package, version, work)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                failed.append(version)
                log(f"{version}: {e}")
                continue
            path = args.out / f"{version.split('.post')[0]}.json"
            path.write_text(json.dumps(surface, sort_keys=True, separators=(",", ":")) + "\n")
            log(f"{version}: {len(surface['module'])} names, {len(surface['enums'])} enums -> {path}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
