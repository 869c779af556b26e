"""bench/machine.py: the memory-bandwidth read, page-cache warming, peak RSS, and GPU memory sampled with nvidia-smi
(skipped without it)."""

from __future__ import annotations

import numpy as np


def test_the_four_stream_read_reads_every_pair_of_sub_chunks():
    from edgevl.bench.machine import STREAMS, _read_as_streams
    chunk = np.arange(4 * 1000, dtype=np.float64)
    parts = np.array_split(chunk, STREAMS)
    assert _read_as_streams(chunk) == float(parts[0] @ parts[1] + parts[2] @ parts[3])


def test_page_cache_warming_reads_every_file(tiny_artifact):
    from edgevl.bench.machine import warm_page_cache
    assert warm_page_cache(tiny_artifact) == sum(p.stat().st_size for p in tiny_artifact.rglob("*") if p.is_file())


def test_peak_rss_sees_an_allocation():
    from edgevl.bench.machine import PeakRSS
    import mmap
    with PeakRSS() as m:
        # 64 MiB of fresh pages, every one touched: an anonymous map, because a numpy array of that size may reuse
        # heap memory that earlier tests freed and glibc kept resident (then RSS does not grow at all)
        block = mmap.mmap(-1, 64 << 20)
        np.frombuffer(block, np.uint8)[:] = 1
        block.close()
    assert m.peak - m.before >= 60 << 20


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *name,driver_version,memory.total*) echo "NVIDIA H100 80GB HBM3, 550.54.15, 81559" ;;
  *) echo 1000; echo 1500; echo 1200; exec sleep 30 ;;
esac
"""


def test_gpu_memory_is_sampled_with_nvidia_smi_and_skipped_without(tmp_path, monkeypatch):
    from edgevl.bench.machine import GpuMemory, gpu_info
    monkeypatch.setenv("PATH", str(tmp_path))                  # no nvidia-smi on the PATH
    with GpuMemory() as gpu:
        pass
    assert gpu.to_json() == {"peak_mb": None, "before_mb": None, "skipped": "no NVIDIA GPU (nvidia-smi not found)"}
    assert gpu_info() == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with GpuMemory(interval_ms=20) as gpu:
        pass
    assert gpu.to_json() == {"peak_mb": 1500.0, "before_mb": 1000.0, "skipped": None}
    assert gpu_info() == [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559.0, "driver": "550.54.15"}]
