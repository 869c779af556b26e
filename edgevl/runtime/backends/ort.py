"""The onnxruntime runners: `OnnxrtRunner` (a session, numpy in and out, buffers written in place) and
`OrtIoBindingRunner` (IO binding on a device: outputs kept there, CUDA-graph decode steps)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.runtime.backends.tensors import ORT_TYPES, DeviceTensor, OrtBuffer, TensorMeta, to_host


class OnnxrtRunner:
    """Runs an onnxruntime.InferenceSession built by a loader.

    infer(feed, bindings): `bindings` maps output names to buffers from `allocate` that the graph writes
    in place (an in-place KV cache is bound as past input and present output at once); the buffers may
    also appear in `feed`. Without bindings it is a plain session.run.
    """

    device, device_id = "cpu", 0
    keep_on_device: tuple[str, ...] = ()
    static_decode = False          # decode steps at fixed addresses (CUDA graphs): see OrtIoBindingRunner
    kv_spare_positions = 0         # cache positions past the last token a call may write (grouped_decode.py)

    def __init__(self, build_session: Callable, name: str = "onnxrt", shrink_on_new_shapes: bool = False,
                 kv_spare_positions: int = 0):
        self.build_session = build_session
        self.kv_spare_positions = kv_spare_positions
        self.name = name
        self.session = None
        # Memory-arena policy for graphs whose activation sizes change from call to call (the vision
        # encoder): keep the arena while the input shapes repeat, and give its free blocks back to the
        # system at the end of a call whose shapes differ from the previous call's (the first call too,
        # so one large photo does not leave its working memory held while the decoder runs).
        self.shrink_on_new_shapes = shrink_on_new_shapes
        self._last_shapes: tuple | None = None
        self._meta: dict[str, TensorMeta] | None = None
        self._outputs: list[str] | None = None

    def activate(self) -> None:
        if self.session is None:
            self.session = self.build_session()
            self._meta = {i.name: TensorMeta(np.dtype(ORT_TYPES[i.type]), tuple(i.shape))
                          for i in self.session.get_inputs()}
            self._outputs = [o.name for o in self.session.get_outputs()]

    def deactivate(self) -> None:
        self.session = self._meta = self._outputs = None

    def input_metadata(self) -> dict[str, TensorMeta]:
        self._require_active()
        return dict(self._meta)

    def output_names(self) -> list[str]:
        self._require_active()
        return list(self._outputs)

    def allocate(self, shape: tuple[int, ...], dtype) -> OrtBuffer:
        """A zeroed buffer on this runner's device that a graph output can be bound to (see `infer`).
        On the host it wraps numpy memory, so nothing is copied in or out."""
        import onnxruntime as ort
        array = np.zeros(shape, dtype)
        return OrtBuffer(ort.OrtValue.ortvalue_from_numpy(array), array)

    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        self._require_active()
        if not bindings and all(isinstance(v, np.ndarray) for v in feed.values()):
            return dict(zip(self._outputs, self.session.run(None, self._in_graph_types(feed), self._arena_policy(feed))))
        return self._run_bound(feed, bindings or {}, self._arena_policy(feed))

    def _in_graph_types(self, feed: dict) -> dict:
        """Float arrays in the float type the graph declares (the runtime computes inputs in float32; an fp16
        graph takes float16), as the IO-binding path and the TensorRT runner copy them in."""
        out = {}
        for name, value in feed.items():
            want = self._meta[name].dtype if name in self._meta else value.dtype
            out[name] = value.astype(want) if value.dtype != want and value.dtype.kind == want.kind == "f" else value
        return out

    def _arena_policy(self, feed: dict):
        """RunOptions that shrink the CPU arena after this call when its input shapes are new (or None)."""
        if not self.shrink_on_new_shapes:
            return None
        shapes = tuple(sorted((name, tuple(np.shape(v))) for name, v in feed.items()))
        changed, self._last_shapes = shapes != self._last_shapes, shapes
        if not changed:
            return None
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    def _run_bound(self, feed: dict, bindings: dict, run_options=None) -> dict:
        """session.run_with_iobinding: buffers and own device values bound as they are, numpy copied in,
        `bindings` as the outputs they name, the rest on the host (or the device, per keep_on_device)."""
        binding = self.session.io_binding()
        keep_alive = []                                   # host arrays must outlive the run
        for name, value in feed.items():
            if isinstance(value, OrtBuffer):
                value.bind_input(binding, name)
            elif isinstance(value, DeviceTensor) and value.owner is self:
                binding.bind_ortvalue_input(name, value.handle)
            else:
                array = np.ascontiguousarray(to_host(value), dtype=self._meta[name].dtype)
                keep_alive.append(array)
                binding.bind_cpu_input(name, array)
        for name in self._outputs:
            if name in bindings:
                bindings[name].bind_output(binding, name)
            else:
                device = name.startswith(self.keep_on_device)
                binding.bind_output(name, self.device if device else "cpu", self.device_id if device else 0)
        self.session.run_with_iobinding(binding, run_options)
        results = {}
        for name, value in zip(self._outputs, binding.get_outputs()):
            if name in bindings:
                results[name] = bindings[name]
            elif name.startswith(self.keep_on_device):
                results[name] = DeviceTensor(value, tuple(value.shape()), ORT_TYPES[value.data_type()], self,
                                             value.numpy)
            else:
                results[name] = value.numpy()
        return results

    def _require_active(self) -> None:
        if self.session is None:
            raise RuntimeError(f"runner {self.name} used before activate()")


class OrtIoBindingRunner(OnnxrtRunner):
    """ONNX Runtime with IO binding on `device`: outputs named in `keep_on_device` stay there as DeviceTensors,
    buffers from `allocate` live there.

    Inputs: numpy arrays are cast to the graph's dtype (input_metadata: fp16 graphs take fp16) and
    copied by ORT; DeviceTensors from this runner and buffers are bound as they are (no copy). Outputs:
    bound buffers are written in place; the rest ORT allocates on `device` or on the host, with the shape
    it computes at run time; a DeviceTensor stays valid as long as it is referenced.
    With device="cpu" the same code runs on the CPU EP (how the CPU tests exercise it).
    """

    def __init__(self, build_session: Callable, name: str = "onnxrt-iobinding", device: str = "cuda",
                 device_id: int = 0, keep_on_device: tuple[str, ...] = (names.PRESENT_PREFIX, names.LOGITS),
                 static_decode: bool = False):
        super().__init__(build_session, name)
        self.device, self.device_id, self.keep_on_device = device, device_id, tuple(keep_on_device)
        self.static_decode = static_decode
        self._static: dict[tuple, OrtBuffer] = {}

    def allocate(self, shape: tuple[int, ...], dtype) -> OrtBuffer:
        """A zeroed buffer on the device (copied from host zeros: ortvalue_from_shape_and_type would hand back
        whatever the allocator's block held, and a NaN there times a zero attention weight is still NaN)."""
        import onnxruntime as ort
        if self.device == "cpu":
            return super().allocate(shape, dtype)
        zeros = np.zeros(shape, dtype)          # calloc'd: reading it maps the zero page, commits no memory
        return OrtBuffer(ort.OrtValue.ortvalue_from_numpy(zeros, self.device, self.device_id), device_id=self.device_id)

    def deactivate(self) -> None:
        super().deactivate()
        self._static = {}

    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        self._require_active()
        if self.static_decode and feed[names.INPUTS_EMBEDS].shape[1] == 1:
            return self._decode_step(feed, bindings or {})
        return self._run_bound(feed, bindings or {}, self._run_options(graph_id=-1))

    # -- static decode steps (CUDA graphs): every input and output at the same device address on every step
    def _decode_step(self, feed: dict, bindings: dict) -> dict:
        """A decode step whose inputs are copied into buffers allocated once per shape (a CUDA graph replays
        the captured addresses) and whose logits / next_token go to fixed buffers as well; only what the
        caller reads comes back (greedy: next_token, B integers)."""
        static = {}
        for name, value in feed.items():
            if name == names.TOTAL_SEQUENCE_LENGTH or isinstance(value, (OrtBuffer, DeviceTensor)):
                static[name] = value                     # a CPU input of GroupQueryAttention / already bound
            else:
                array = np.ascontiguousarray(value, dtype=self._meta[name].dtype)
                static[name] = self._buffer(name, array.shape, array.dtype)
                static[name].ortvalue.update_inplace(array)
        batch = feed[names.INPUTS_EMBEDS].shape[0]
        outputs = {name: self._buffer(name, (batch, *shape[1:]), dtype) for name, (shape, dtype)
                   in self._fixed_outputs().items()}
        return self._run_bound(static, {**bindings, **outputs}, self._run_options(graph_id=batch))

    def _buffer(self, name: str, shape: tuple, dtype) -> OrtBuffer:
        key = (name, tuple(shape), np.dtype(dtype).str)
        if key not in self._static:
            self._static[key] = self.allocate(tuple(shape), dtype)
        return self._static[key]

    def _fixed_outputs(self) -> dict:
        """Outputs of a decode step with a shape known in advance (all but batch): logits [B, vocab], next_token."""
        out = {}
        for o in self.session.get_outputs():
            if o.name in (names.LOGITS, names.NEXT_TOKEN) and all(isinstance(d, int) for d in o.shape[1:]):
                out[o.name] = (tuple(o.shape), ORT_TYPES[o.type])
        return out

    def _run_options(self, graph_id: int):
        """gpu_graph_id: which captured CUDA graph a run replays (-1: none, e.g. a prefill of any length)."""
        if not self.static_decode:
            return None
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options
