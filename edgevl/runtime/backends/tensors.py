"""What runners hand each other: tensor metadata, outputs left on an accelerator (`DeviceTensor`), buffers a graph
writes in place (`OrtBuffer`, `BufferPointer`) and `to_host`, the one way to get numpy from any of them.

Accelerator runners may leave chosen outputs on the device (`keep_on_device`, e.g. the KV cache `present.*`): they
come back as `DeviceTensor`s, opaque values with `.shape` and `.dtype` that the same runner accepts back as inputs
(`past_key_values.*`) without a copy. The generate loop only reads `.shape`, so it drives host and device caches
alike; only `logits` (and the vision encoder's outputs) come back to the host as numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, strings for symbolic ones


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class DeviceTensor:
    """A runner's output left on the accelerator. Opaque: `.shape`, `.dtype`, and `.numpy()` (a copy to host).

    `handle` is the runner's own (an OrtValue for ONNX Runtime, a device pointer for TensorRT);
    only the runner that made it knows how to bind it again.
    """

    __slots__ = ("handle", "shape", "dtype", "owner", "_to_host")

    def __init__(self, handle, shape: tuple, dtype, owner, to_host: Callable[[], np.ndarray]):
        self.handle, self.shape, self.dtype, self.owner, self._to_host = handle, tuple(shape), np.dtype(dtype), \
            owner, to_host

    def numpy(self) -> np.ndarray:
        return self._to_host()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._to_host()
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        """Slicing copies to the host (chat trims its cache to a common prefix once per turn); the
        runners take numpy past values back, copying them to the device again."""
        return self._to_host()[index]

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={self.shape}, dtype={self.dtype})"


class OrtBuffer:
    """A buffer a graph reads and writes in place (an in-place KV cache): an OrtValue on the runner's device.

    On the host it wraps numpy memory (`array`): `numpy()` is a view, nothing is ever copied.
    On a GPU `numpy()` copies to the host.

    `rows(start, stop)` is a view of rows [start, stop) of the first axis (the batch of a KV buffer), no copy:
    on the host a numpy slice wrapped as an OrtValue; in device memory (or with by_pointer) a raw address,
    base + start * row bytes, that `bind_input` / `bind_output` hand to IOBinding with its shape and type.
    """

    __slots__ = ("ortvalue", "array", "pointer", "device_id", "base")

    def __init__(self, ortvalue, array: np.ndarray | None = None, pointer: "BufferPointer | None" = None,
                 device_id: int = 0, base: "OrtBuffer | None" = None):
        self.ortvalue, self.array, self.pointer, self.device_id = ortvalue, array, pointer, device_id
        self.base = base        # a view keeps the buffer it points into alive

    @property
    def shape(self) -> tuple:
        return self.pointer.shape if self.pointer is not None else tuple(self.ortvalue.shape())

    @property
    def dtype(self) -> np.dtype:
        if self.pointer is not None:
            return self.pointer.dtype
        return np.dtype(self.array.dtype if self.array is not None else ORT_TYPES[self.ortvalue.data_type()])

    def data_ptr(self) -> int:
        return self.pointer.address if self.pointer is not None else self.ortvalue.data_ptr()

    def numpy(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        if self.ortvalue is None:
            raise RuntimeError("a row view of device memory cannot be read on the host; read its whole buffer")
        return self.ortvalue.numpy()

    def rows(self, start: int, stop: int, by_pointer: bool = False) -> "OrtBuffer":
        """Rows [start, stop) of axis 0, sharing this buffer's memory; by_pointer: bound by raw address even on
        the host (how device memory is always bound; lets the CPU tests run that path)."""
        shape = self.shape
        if not 0 <= start < stop <= shape[0]:
            raise ValueError(f"rows {start}:{stop} of a buffer of {shape[0]}")
        view = self.array[start:stop] if self.array is not None else None
        if view is not None and not by_pointer:
            import onnxruntime as ort
            return OrtBuffer(ort.OrtValue.ortvalue_from_numpy(view), view, base=self)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        device = self.pointer.device if self.pointer is not None else self.ortvalue.device_name().lower()
        pointer = BufferPointer(device, self.device_id, self.dtype, (stop - start, *shape[1:]),
                                self.data_ptr() + start * row_bytes)
        return OrtBuffer(None, view, pointer, self.device_id, base=self)

    def bind_input(self, binding, name: str) -> None:
        if self.pointer is None:
            binding.bind_ortvalue_input(name, self.ortvalue)
        else:
            p = self.pointer
            binding.bind_input(name, p.device, p.device_id, p.dtype, list(p.shape), p.address)

    def bind_output(self, binding, name: str) -> None:
        if self.pointer is None:
            binding.bind_ortvalue_output(name, self.ortvalue)
        else:
            p = self.pointer
            binding.bind_output(name, p.device, p.device_id, p.dtype, list(p.shape), p.address)


@dataclass(frozen=True)
class BufferPointer:
    """Where a row view of a buffer lives: device ("cpu", "cuda"), device id, element type, shape, address."""

    device: str
    device_id: int
    dtype: np.dtype
    shape: tuple
    address: int


def to_host(value) -> np.ndarray:
    """numpy for anything a runner returns or holds (DeviceTensors and OrtValues are copied to the host)."""
    if isinstance(value, np.ndarray):
        return value
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
