"""Loaders build inference sessions; runners execute them behind one interface.

Polygraphy's split: a *loader* is a callable that builds something expensive
(`SessionFromOnnx()` -> onnxruntime.InferenceSession), a *runner* owns it and
exposes

    activate()                      build / acquire resources
    infer(feed, bindings) -> dict   name -> numpy array, both ways; `bindings`: outputs written into
                                    buffers made by allocate() (an in-place KV cache)
    deactivate()                    release them
    input_metadata() -> dict        name -> TensorMeta(dtype, shape)

so the generation loop never knows which backend it drives, and one comparator
can check any two runners against each other. Backends other than ONNX Runtime on
the CPU are added as new runner classes; optional packages are imported lazily.

Accelerator runners may leave chosen outputs on the device (`keep_on_device`, e.g. the
KV cache `present.*`): they come back as `DeviceTensor`s, opaque values with `.shape` and
`.dtype` that the same runner accepts back as inputs (`past_key_values.*`) without a copy.
The generate loop only reads `.shape`, so it drives host and device caches alike; only
`logits` (and the vision encoder's `image_embeds`) come back to the host as numpy.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgevl.artifact import names
from edgevl.errors import EdgevlError


@dataclass(frozen=True)
class TensorMeta:
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, strings for symbolic ones


class Runner(Protocol):
    name: str

    def activate(self) -> None: ...
    def infer(self, feed: dict[str, np.ndarray], bindings: dict | None = None) -> dict[str, np.ndarray]: ...
    def deactivate(self) -> None: ...
    def input_metadata(self) -> dict[str, TensorMeta]: ...


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
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
        return np.dtype(self.array.dtype if self.array is not None else _ORT_TYPES[self.ortvalue.data_type()])

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


def provider_names(providers) -> list[str]:
    """['CUDAExecutionProvider', ...] from ORT's providers list (names, or (name, options) pairs)."""
    return [p[0] if isinstance(p, (tuple, list)) else p for p in providers]


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

SHARED_THREADS_ENV = "EDGEVL_SHARED_THREADS"      # "0": share_thread_pool() does nothing
_shared_pool: int | None = None                   # intra-op threads of the process-wide pool, once made


def share_thread_pool(threads: int = 0) -> bool:
    """Run every onnxruntime session this process makes from now on on ONE intra-op thread pool of
    `threads` threads (0: onnxruntime's default, one per physical core), instead of a pool per session.

    With a pool per session, the vision encoder's threads are still spinning when the decoder's start
    prefill, and on a small CPU they take its cores: 2b-l4 int8 on a 2-core EPYC, vision 218 -> 190 ms and
    prefill 112 -> 83-103 ms with one pool, decode unchanged. It is for the process's lifetime, and
    afterwards onnxruntime refuses sessions with pools of their own -- also the ones its quantization tools
    make -- so the commands that only run a model (run, chat, serve, bench) call it, `quantize` does not.
    The first call sizes the pool. Returns whether the pool is in use (False when EDGEVL_SHARED_THREADS=0)."""
    global _shared_pool
    if _shared_pool is None:
        if os.environ.get(SHARED_THREADS_ENV, "1") == "0":
            return False
        import onnxruntime as ort
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool = threads
    return True


def session_options(threads: int = 0, prepack: bool = True, optimization_level: str = "all"):
    """onnxruntime.SessionOptions as edgevl makes every session: `threads` intra-op threads (0 = ORT's
    default; after share_thread_pool(), the process's one pool instead), errors-only logging, optional weight
    pre-packing and the graph optimization level. CPU tensors come from onnxruntime's memory arena (a runner
    may shrink it after a call: OnnxrtRunner's shrink_on_new_shapes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if _shared_pool is None:
        options.intra_op_num_threads = threads
    else:                       # share_thread_pool() sized the one pool; sessions cannot have their own
        options.use_per_session_threads = False
    options.log_severity_level = 3  # errors only: the function-inlining notices are noise to users
    if not prepack:
        # CPU kernels re-pack weights when a session is created (2b-l4 decoder: ~2 s); skipping it
        # loads in ~0.1 s and costs ~7 % decode speed (measured on a 2-core EPYC).
        options.add_session_config_entry("session.disable_prepacking", "1")
    levels = ort.GraphOptimizationLevel
    options.graph_optimization_level = dict(zip(OPTIMIZATION_LEVELS, (
        levels.ORT_DISABLE_ALL, levels.ORT_ENABLE_BASIC, levels.ORT_ENABLE_EXTENDED, levels.ORT_ENABLE_ALL))
    )[optimization_level]
    return options


class SessionFromOnnx:
    """Loader: builds an onnxruntime.InferenceSession for one graph.

    `providers` is ONNX Runtime's list: names or (name, provider-options) pairs, first preferred.
    `config_entries`: extra (key, value) session config entries, e.g. ("session.disable_cpu_ep_fallback", "1"),
    with which onnxruntime refuses to make a session that would run a node on the CPU (ort-cuda sets it where
    ort_placement predicts no such node; the CPU EP must then not be named in `providers`).
    """

    def __init__(self, path: str | os.PathLike, providers=("CPUExecutionProvider",), intra_op_threads: int = 0,
                 optimization_level: str = "all", prepack: bool = True, disabled_optimizers: tuple[str, ...] = (),
                 transform: Callable | None = None, config_entries: tuple[tuple[str, str], ...] = ()):
        self.path = Path(path)
        self.config_entries = tuple(config_entries)
        # transform(ModelProto) edits the graph before the session is made: the file on disk is not changed,
        # its external weights are memory-mapped and handed over as they are. It may return {name: array} of
        # new weights, handed over the same way (int8_prefill.py).
        self.transform = transform
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.optimization_level = optimization_level
        self.prepack = prepack
        self.disabled_optimizers = tuple(disabled_optimizers)

    def __call__(self):
        import onnxruntime as ort

        options = session_options(self.intra_op_threads, self.prepack, self.optimization_level)
        for key, value in self.config_entries:
            options.add_session_config_entry(key, value)
        missing = [p for p in provider_names(self.providers) if p not in ort.get_available_providers()]
        if missing:
            raise EdgevlError(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} "
                              f"(available: {', '.join(ort.get_available_providers())}).")
        try:
            model, keep = (str(self.path), None) if self.transform is None else self._transformed(options)
            session = ort.InferenceSession(model, options, providers=self.providers,
                                           disabled_optimizers=list(self.disabled_optimizers) or None)
        except Exception as e:  # a corrupt or foreign graph: one sentence, not an ORT stack
            raise EdgevlError(_load_failure(self.path.name, str(e))) from None
        # ORT quietly drops a provider whose libraries fail to load (CUDA, cuDNN, TensorRT): never run
        # on the CPU while the user asked for a GPU.
        dropped = [p for p in provider_names(self.providers) if p not in session.get_providers()]
        if dropped:
            raise EdgevlError(f"onnxruntime could not start {', '.join(dropped)} for {self.path.name} (its CUDA, "
                              f"cuDNN or TensorRT libraries did not load; see `edgevl doctor`).")
        if keep is not None:
            session._edgevl_weights = keep      # the memory maps must live as long as the session
            release_maps(keep)
        return session

    def _transformed(self, options) -> tuple[bytes, list]:
        """The graph after self.transform, as bytes, with its external weights handed to `options` as views of
        memory maps of their files (onnxruntime finds external data only next to a model file, never for
        bytes). Returns (bytes, the maps): release_maps() drops their pages once the session is made."""
        import mmap

        import onnx
        import onnxruntime as ort
        from onnx.external_data_helper import uses_external_data

        from edgevl.artifact.folder import inside

        model = onnx.load(str(self.path), load_external_data=False)
        result = self.transform(model)
        new = result if isinstance(result, dict) else {}        # new weights, when it made any
        maps, names_, values = {}, [], []
        if new:         # the arrays' memory goes; onnxruntime reads their copies in a file it can drop
            maps[None], views = _file_backed(new)
            for name, view in views.items():
                model.graph.initializer.append(_declared(name, view))
                names_.append(name)
                values.append(ort.OrtValue.ortvalue_from_numpy(view))
        new_names = set(new)
        del result, new
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor) or tensor.name in new_names:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            if info["location"] not in maps:
                with open(inside(self.path.parent, info["location"]), "rb") as f:
                    maps[info["location"]] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            count = int(np.prod(tensor.dims, dtype=np.int64))
            array = np.frombuffer(maps[info["location"]], dtype, count, int(info.get("offset", 0)))
            names_.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array.reshape(tuple(tensor.dims))))
        if names_:
            options.add_external_initializers(names_, values)
        return model.SerializeToString(), [list(maps.values()), values]


def _load_failure(name: str, message: str) -> str:
    """The sentence for an onnxruntime session that could not be made."""
    if "fallback to CPU EP has been explicitly disabled" in message:
        return (f"onnxruntime would run some nodes of {name} on the CPU (no kernel on the GPU for their types), "
                f"which this backend does not allow; `edgevl doctor` names what each backend needs.")
    return f"onnxruntime could not load {name}: {message.splitlines()[0] if message else 'no reason given'}"


_ALIGN = 64


def _file_backed(arrays: dict[str, np.ndarray]):
    """(map, {name: read-only view}): the arrays written one after another (64-byte aligned) to an unlinked
    temporary file and mapped. Once onnxruntime has packed them, release_maps drops their pages as it does the
    artifact's own weights' (anonymous memory could not be given back without losing it)."""
    import mmap
    import tempfile
    offsets = {}
    with tempfile.TemporaryFile(prefix="edgevl-weights-") as f:
        for name, array in arrays.items():
            f.write(b"\0" * (-f.tell() % _ALIGN))
            offsets[name] = f.tell()
            f.write(np.ascontiguousarray(array).tobytes())
        f.flush()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)     # the map keeps the file alive
    views = {name: np.frombuffer(mapped, a.dtype, a.size, offsets[name]).reshape(a.shape) for name, a in arrays.items()}
    return mapped, views


def _declared(name: str, array: np.ndarray):
    """An initializer that only names, types and shapes `array`: its data comes as an external initializer."""
    import onnx
    tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="edgevl-memory")
    return tensor


def release_maps(keep: list) -> None:
    """Drop the pages of the weight maps from memory once onnxruntime has made its packed copies: what a session
    still reads from them (weights it does not pre-pack) comes back from the page cache on first use, as it
    does when onnxruntime maps the file itself (full 2B fp32 decoder: peak RSS 15.4 -> 9.4 GB, 9.0 GB when
    onnxruntime loads the file itself)."""
    import mmap
    for m in keep[0]:
        m.madvise(mmap.MADV_DONTNEED)


def activate_all(runners: list["Runner"], concurrently: bool = True) -> None:
    """Activate several runners, at the same time when `concurrently`.

    Session creation is native code that releases the GIL (onnxruntime parses the graph
    and pre-packs its weights on one thread per session), so the vision encoder and the
    decoder load in about the time of the slower one (2b-l4 fp32 on 2 cores: median 4.1 s
    instead of 4.6 s one after the other). The first error is raised after all finish;
    runners that did activate are deactivated again, so nothing is left half-loaded.
    """
    if not concurrently or len(runners) < 2:
        for runner in runners:
            runner.activate()
        return
    with ThreadPoolExecutor(len(runners), thread_name_prefix="edgevl-load") as pool:
        futures = [pool.submit(runner.activate) for runner in runners]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for runner, future in zip(runners, futures):
            if future.exception() is None:
                runner.deactivate()
        raise errors[0]


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
            self._meta = {i.name: TensorMeta(np.dtype(_ORT_TYPES[i.type]), tuple(i.shape))
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
            return dict(zip(self._outputs, self.session.run(None, feed, self._arena_policy(feed))))
        return self._run_bound(feed, bindings or {}, self._arena_policy(feed))

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
                results[name] = DeviceTensor(value, tuple(value.shape()), _ORT_TYPES[value.data_type()], self,
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
                 device_id: int = 0, keep_on_device: tuple[str, ...] = ("present.", "logits"),
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
                out[o.name] = (tuple(o.shape), _ORT_TYPES[o.type])
        return out

    def _run_options(self, graph_id: int):
        """gpu_graph_id: which captured CUDA graph a run replays (-1: none, e.g. a prefill of any length)."""
        if not self.static_decode:
            return None
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options


def compare_outputs(a: dict, b: dict, atol: float, rtol: float = 0.0) -> dict:
    """Comparator: max abs error per output shared by two runners' results, and whether all pass.

    Values may be numpy arrays or DeviceTensors (copied to the host here)."""
    report = {}
    for name in a.keys() & b.keys():
        x, y = to_host(a[name]), to_host(b[name])
        err = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        bound = atol + rtol * float(np.max(np.abs(y))) if y.size else atol
        report[name] = {"max_abs_error": err, "ok": err <= bound}
    return {"outputs": report, "ok": all(r["ok"] for r in report.values())}
