"""What this machine has: GPUs, driver, CUDA/cuDNN/TensorRT libraries, onnxruntime, Jetson model.

Every probe is cheap, never raises, and needs nothing but the standard library:
the NVIDIA pieces are asked through their C entry points with ctypes (the driver's
libcuda, libcudart, libcudnn, libnvinfer), so the same code runs on x86_64 and on a
Jetson (aarch64), with or without torch, tensorrt or cuda-python installed. Each
answer is a value or None plus, where something is missing, a reason in words;
`backends.py` turns those into availability and `doctor.py` into a report.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Sonames to try, newest first. Jetson JetPack 6 ships CUDA 12.x, TensorRT 10.3, cuDNN 9.
CUDART_SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")
CUDNN_SONAMES = ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so")
NVINFER_SONAMES = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so")
# The C and C++ runtime a provider library also names: always there, not NVIDIA's.
SYSTEM_LIBRARIES = ("libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so", "libstdc++.so", "libgcc_s.so",
                    "ld-linux")

# cuDeviceGetAttribute ids (cuda.h): compute capability major / minor.
_CC_MAJOR, _CC_MINOR = 75, 76


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def _load(sonames) -> tuple[ctypes.CDLL | None, str | None]:
    """First library of `sonames` that the dynamic loader finds, and its name."""
    for name in sonames:
        try:
            return ctypes.CDLL(name), name
        except OSError:
            continue
    return None, None


@functools.lru_cache(maxsize=1)
def cuda_driver() -> tuple[list[GpuInfo], int | None, str]:
    """(GPUs the driver sees, driver CUDA version as 13000-style int, reason when none)."""
    lib, _ = _load(("libcuda.so.1", "libcuda.so"))
    if lib is None:
        return [], None, "no NVIDIA driver here (libcuda.so.1 not found)"
    if lib.cuInit(0) != 0:
        return [], None, "the NVIDIA driver is installed but cuInit failed (no GPU visible, or a driver mismatch)"
    version = ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(version))
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return [], version.value, "the NVIDIA driver found no GPU"
    gpus = []
    for i in range(count.value):
        dev, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        major, minor, mem = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
        lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        gpus.append(GpuInfo(i, name.value.decode(errors="replace"), (major.value, minor.value), mem.value))
    return gpus, version.value, ""


def gpus() -> list[GpuInfo]:
    return cuda_driver()[0]


def no_gpu_reason() -> str:
    """'' when at least one GPU is usable, else why not."""
    return cuda_driver()[2]


def format_cuda_version(v: int | None) -> str | None:
    """12060 -> '12.6' (the encoding of cuDriverGetVersion / cudaRuntimeGetVersion)."""
    return None if not v else f"{v // 1000}.{(v % 1000) // 10}"


def cuda_runtime_version() -> str | None:
    lib, _ = _load(CUDART_SONAMES)
    if lib is None:
        return None
    v = ctypes.c_int(0)
    return format_cuda_version(v.value) if lib.cudaRuntimeGetVersion(ctypes.byref(v)) == 0 else None


def cudnn_version() -> str | None:
    """cuDNN 9 encodes 9.3.0 as 90300, cuDNN 8 encodes 8.9.7 as 8907."""
    lib, _ = _load(CUDNN_SONAMES)
    if lib is None:
        return None
    lib.cudnnGetVersion.restype = ctypes.c_size_t
    v = int(lib.cudnnGetVersion())
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def decode_trt_version(v: int) -> str:
    """getInferLibVersion(): TensorRT >= 10 is major*10000+minor*100+patch, older major*1000+minor*100+patch."""
    if v >= 100000:
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def tensorrt_version() -> str | None:
    """TensorRT's version from the `tensorrt` package if installed, else from libnvinfer itself."""
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt
            return tensorrt.__version__
        except Exception:  # a broken install: fall through to the library
            pass
    lib, _ = _load(NVINFER_SONAMES)
    return decode_trt_version(int(lib.getInferLibVersion())) if lib is not None else None


@dataclass(frozen=True)
class ProviderLibrary:
    """One of onnxruntime's provider libraries (capi/libonnxruntime_providers_<name>.so) and the NVIDIA libraries
    it was linked against (its ELF DT_NEEDED entries), read without loading it."""

    name: str                        # "cuda" | "tensorrt"
    path: Path | None                # None: this onnxruntime has none (the CPU build)
    needed: tuple[str, ...] = ()     # sonames, the C/C++ runtime left out
    missing: tuple[str, ...] = ()    # those the dynamic loader cannot load here

    def major(self, stem: str) -> int | None:
        """The soname version of a needed library: major("libnvinfer") -> 10 for libnvinfer.so.10."""
        for soname in self.needed:
            base, _, version = soname.partition(".so.")
            if base == stem and version.split(".")[0].isdigit():
                return int(version.split(".")[0])
        return None


def onnxruntime_folder() -> Path | None:
    """onnxruntime's package folder, found without importing it."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def provider_library(name: str, folder: Path | None = None, loadable=None) -> ProviderLibrary:
    """What onnxruntime's `name` provider library needs and which of those do not load here.

    folder: onnxruntime's package folder (default: the installed one); loadable(soname) -> bool (default: the
    dynamic loader, through ctypes)."""
    from edgevl.runtime.backends.elf import read_dynamic
    folder = onnxruntime_folder() if folder is None else folder
    path = folder / "capi" / f"libonnxruntime_providers_{name}.so" if folder is not None else None
    if path is None or not path.is_file():
        return ProviderLibrary(name, None)
    try:
        needed = tuple(n for n in read_dynamic(path).needed if not n.startswith(SYSTEM_LIBRARIES))
    except (OSError, ValueError):
        return ProviderLibrary(name, path)
    loadable = loadable or (lambda soname: _load((soname,))[0] is not None)
    return ProviderLibrary(name, path, needed, tuple(n for n in needed if not loadable(n)))


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def onnxruntime_info() -> tuple[str | None, list[str]]:
    """(onnxruntime.__version__, its execution providers); (None, []) without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return ort.__version__, list(ort.get_available_providers())


def cuda_python_module():
    """cuda-python's runtime module (12.6+/13: cuda.bindings.runtime; older: cuda.cudart), or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def jetson_model() -> str | None:
    """'NVIDIA Jetson AGX Orin Developer Kit' from the device tree, or None off Jetson."""
    path = Path("/proc/device-tree/model")
    try:
        text = path.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return None
    return text or None


def l4t_release() -> str | None:
    """First line of /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, ...'), or None."""
    try:
        return Path("/etc/nv_tegra_release").read_text().splitlines()[0].lstrip("# ").strip()
    except (OSError, IndexError):
        return None


def nvidia_smi_query(fields: str) -> list[list[str]] | str | None:
    """`nvidia-smi --query-gpu=FIELDS` as rows of strings (no units); an error sentence when it fails;
    None when nvidia-smi is absent (Jetson has none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed ({type(e).__name__})"
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    width = fields.count(",") + 1
    if out.returncode != 0 or not rows or any(len(r) != width for r in rows):
        message = (out.stderr or out.stdout).strip()
        return message.splitlines()[0] if message else f"exit status {out.returncode}"
    return rows


def nvidia_smi() -> dict | None:
    """Driver version and GPU names as nvidia-smi reports them; None when it is absent (Jetson has none)."""
    rows = nvidia_smi_query("name,driver_version,memory.total")
    if rows is None or isinstance(rows, str):
        return None if rows is None else {"error": rows}
    return {"driver_version": rows[0][1], "gpus": [{"name": r[0], "memory_total_mb": float(r[2])} for r in rows]}


def package_versions(names) -> dict[str, str]:
    """edgevl's version and each installed package's among `names` (absent ones left out)."""
    from importlib import metadata

    from edgevl import __version__
    versions = {"edgevl": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def meminfo_bytes(field: str, path: str = "/proc/meminfo") -> int | None:
    """One /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes; None where unknown (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first processor; empty where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except (OSError, IndexError):
        pass
    return frozenset()


def machine() -> str:
    return platform.machine()
