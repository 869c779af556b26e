"""The machine a benchmark ran on: description, memory bandwidth, peak host RSS and GPU memory.

* `machine_info()`: CPU model, cores, RAM, GPU (via nvidia-smi, when present),
  package versions, load average, for the JSON report.
* `measure_bandwidth()`: how many bytes per second numpy moves through DRAM on
  this machine, measured in the same process as the benchmark. It is a *measured*
  number, not the vendor's peak: a float64 sum over a buffer far larger than the
  caches (reads), on one thread and on all cores (chunks in a thread pool; numpy
  releases the GIL in reductions), the same chunks read as four streams per thread
  (dot products of sub-chunk pairs: a matrix-vector product's rows are read like
  that, and several streams per core get ~10 % more from the memory system than one
  here), and a copy of it (reads + writes, both counted), best of a few repeats.
  `best_bytes_per_s`, the highest of these, is what the roofline divides by: a lower
  bound on what the memory system can deliver (ONNX Runtime's kernels may stream
  faster than numpy; a busy machine, or another tenant of a VM's host, lowers it).
* `PeakRSS`: peak resident set size over a block. On Linux it resets the kernel's
  high-water mark (`/proc/self/clear_refs` <- 5) and reads `VmHWM` afterwards, so
  the peak is exact and costs nothing; elsewhere it samples RSS in a thread.
* `GpuMemory`: peak device memory in use over a block, sampled with nvidia-smi;
  reports None (and why) when there is no NVIDIA GPU.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgevl.bench.stats import bandwidth
from edgevl.runtime.backends.probe import nvidia_smi, package_versions

PACKAGES = ("numpy", "onnxruntime", "onnx", "tokenizers", "pillow", "torch", "transformers",
            "matplotlib", "psutil", "tqdm")


# ----------------------------------------------------------------------------- description
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    from edgevl.runtime.backends.probe import meminfo_bytes
    return meminfo_bytes("MemTotal")


def _physical_cores() -> int | None:
    try:
        import psutil
        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def gpu_info() -> list[dict]:
    """[{name, memory_total_mb, driver}] for each NVIDIA GPU nvidia-smi reports; [] without one."""
    smi = nvidia_smi()
    if not smi or "error" in smi:
        return []
    return [{**gpu, "driver": smi["driver_version"]} for gpu in smi["gpus"]]


def machine_info() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "ram_bytes": _total_ram_bytes(),
        "gpus": gpu_info(),
        "onnxruntime_providers": providers,
        "load_average_at_start": list(load) if load else None,
        "versions": package_versions(PACKAGES),
    }


def machine_slug(info: dict) -> str:
    """A file-name friendly machine name, e.g. 'amd-epyc-2c'."""
    words = "".join(c if c.isalnum() else " " for c in info.get("cpu_model", "cpu").lower()).split()
    words = [w for w in words if w not in ("processor", "cpu", "with", "radeon", "graphics", "core", "tm", "r")]
    return "-".join(words[:4] + [f"{info.get('logical_cores') or 0}c"])


# ----------------------------------------------------------------------------- bandwidth
def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5, threads: int | None = None) -> dict:
    """Measured DRAM bandwidth in bytes/s (see the module docstring for what exactly is measured)."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(max(nbytes // 8, 1), np.float64)           # ones: every page touched before timing
    chunks = np.array_split(a, threads)

    def best(fn, moved: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return bandwidth(moved, min(times))

    single = best(lambda: a.sum(), a.nbytes)
    with ThreadPoolExecutor(threads) as pool:
        multi = best(lambda: list(pool.map(np.sum, chunks)), a.nbytes)
        streams = best(lambda: list(pool.map(_read_as_streams, chunks)), a.nbytes)
    b = np.empty_like(a)
    copy = best(lambda: np.copyto(b, a), 2 * a.nbytes)     # read + write, write-allocate not counted
    return {
        "best_bytes_per_s": max(single, multi, streams, copy),
        "read_bytes_per_s": max(single, multi, streams),
        "read_1thread_bytes_per_s": single,
        "read_all_threads_bytes_per_s": multi,
        "read_streams_bytes_per_s": streams,
        "copy_bytes_per_s": copy,
        "buffer_bytes": int(nbytes),
        "threads": threads,
        "repeats": repeats,
        "method": (f"numpy float64 sum over a {nbytes >> 20} MiB buffer on 1 and {threads} threads, and read as "
                   f"{STREAMS} streams per thread (dot products), best of {repeats}; copy counts read+write bytes. "
                   "A measured figure, not the hardware peak."),
    }


STREAMS = 4


def _read_as_streams(chunk: np.ndarray) -> float:
    """Read `chunk` once as STREAMS concurrent streams: dot products of its sub-chunks, two at a time."""
    parts = np.array_split(chunk, STREAMS)
    n = min(len(p) for p in parts)
    return sum(float(np.dot(parts[i][:n], parts[i + 1][:n])) for i in range(0, STREAMS, 2))


# ----------------------------------------------------------------------------- page cache
def warm_page_cache(folder, chunk: int = 16 << 20) -> int:
    """Read every file under `folder` once so a timed load finds them in the page cache; returns the bytes.

    Load time otherwise measures the disk, and which engine the OS happened to evict (a VM that
    reclaims idle page cache makes the first load of a run several times slower than the next).
    Both engines are warmed the same way, so their load times compare parsing, copying and weight
    packing, as a second run of the same command sees them.
    """
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while block := f.read(chunk):
                        total += len(block)
            except OSError:
                pass
    return total


# ----------------------------------------------------------------------------- memory
def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    kb = _read_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """with PeakRSS() as m: ...  ->  m.peak (bytes), m.before (RSS at entry), m.method."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = self.before = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.before = current_rss()
        if _reset_hwm():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = f"RSS sampled every {self.interval_s * 1e3:g} ms"
            self.peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        else:
            self.peak = max((_read_status_kb("VmHWM") or 0) * 1024, current_rss())
        return False


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)   # all but idle and iowait


class CpuContention:
    """How many cores *other* processes kept busy during a block, on average (Linux /proc/stat minus this
    process's own CPU time). 0 on a quiet machine; near 1 means one core was taken from the benchmark."""

    other_cores: float | None = None

    def __enter__(self):
        self.busy0, self.own0, self.wall0 = _busy_jiffies(), sum(os.times()[:4]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy1, own1, wall = _busy_jiffies(), sum(os.times()[:4]), time.perf_counter() - self.wall0
        if self.busy0 is not None and busy1 is not None and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            self.other_cores = max(0.0, ((busy1 - self.busy0) / hz - (own1 - self.own0)) / wall)
        return False


class GpuMemory:
    """Peak GPU memory in use (MiB, all processes, GPU 0) over a block, sampled by `nvidia-smi -lms`."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self.peak_mb = self.before_mb = None
        self.skipped = None
        self._proc = None
        self._samples: list[float] = []

    def __enter__(self):
        if shutil.which("nvidia-smi") is None:
            self.skipped = "no NVIDIA GPU (nvidia-smi not found)"
            return self
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0",
               f"-lms={self.interval_ms}"]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            self.skipped = f"nvidia-smi failed ({e})"
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(self.interval_ms / 1e3 * 2)
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                self._samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            time.sleep(self.interval_ms / 1e3 * 2)
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._reader.join(timeout=2)
            if self._samples:
                self.before_mb, self.peak_mb = self._samples[0], max(self._samples)
            else:
                self.skipped = "nvidia-smi reported nothing"
        return False

    def to_json(self) -> dict:
        return {"peak_mb": self.peak_mb, "before_mb": self.before_mb, "skipped": self.skipped}
