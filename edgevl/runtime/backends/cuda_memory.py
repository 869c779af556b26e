"""Device memory for the trt backend through cuda-python: streams, cudaMalloc, async copies.

Imported by trt.py (TrtRunner's default memory); cuda-python itself is imported only when a CudaMemory is made.
tests/fake_trt.py's HostMemory stands in for it on a CPU.
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import EdgevlError


class CudaMemory:
    """The runner's only CUDA calls, through cuda-python: streams, cudaMalloc, async copies."""

    def __init__(self, device_id: int = 0):
        from edgevl.runtime.backends.probe import cuda_python_module
        self.rt = cuda_python_module()
        if self.rt is None:
            from edgevl.runtime.backends import packages, probe
            hint = packages.cuda_python(probe.jetson_model() is not None, probe.cuda_runtime_version(),
                                        probe.cuda_driver()[1])
            raise EdgevlError(f"the trt backend needs cuda-python for device memory ({hint}).")
        self._check(self.rt.cudaSetDevice(device_id))

    def _check(self, result):
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {self.rt.cudaGetErrorName(err)[1]!r}")
        return rest[0] if len(rest) == 1 else None

    def stream(self):
        return self._check(self.rt.cudaStreamCreate())

    def handle(self, stream) -> int:
        return int(stream)

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, ptr: int, array: np.ndarray, stream) -> None:
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, array: np.ndarray, ptr: int, stream) -> None:
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def destroy(self, stream) -> None:
        self.rt.cudaStreamDestroy(stream)
