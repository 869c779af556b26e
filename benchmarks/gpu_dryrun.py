"""pytest plugin for a CPU dry run of the GPU check: `ort-cuda` pretends to be available and is backed by
the same IO-binding runner on ONNX Runtime's CPU EP (device "cpu"), so tests/runtime/backends/test_gpu.py and
benchmarks/gpu_check.sh run end to end on a machine without a GPU:

    PYTHONPATH=benchmarks python -m pytest -p gpu_dryrun -m gpu tests/runtime/backends/test_gpu.py \
        -k "not kv_cache_stays and not doctor_sees"      # these two check real CUDA placement

Never loaded by default; it changes nothing on a machine where it is not named.
"""

from dataclasses import replace

from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import ort_placement
from edgevl.runtime.backends import ort, ort_session


def _cpu_io_binding(graph, opts):
    # the real factory's graph check first (it refuses an fp32 decoder), then the CPU stand-in
    ort_placement.check_for_cuda(graph.path, str(graph.path.parent), graph.spec.precision)
    return ort.OrtIoBindingRunner(ort_session.SessionFromOnnx(graph.path), name="dry-run-cuda", device="cpu",
                                      static_decode=opts.cuda_graph and graph.spec.kv_cache == "in_place")


backends.BACKENDS["ort-cuda"] = replace(backends.BACKENDS["ort-cuda"], available=lambda: (True, ""),
                                        factory=_cpu_io_binding)
