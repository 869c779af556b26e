"""onnxruntime sessions as edgevl makes them: the process's one thread pool, session options, and the loader
`SessionFromOnnx` (with an optional in-memory graph edit whose weights are handed over as memory maps)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgevl.errors import EdgevlError


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
                 transform: Callable | None = None, config_entries: tuple[tuple[str, str], ...] = (),
                 weights_cache: Path | None = None):
        self.path = Path(path)
        self.config_entries = tuple(config_entries)
        # transform(ModelProto) edits the graph before the session is made: the file on disk is not changed,
        # its external weights are memory-mapped and handed over as they are. It may return new weights as
        # {name: array} or an iterator of (name, array) pairs, handed over the same way (int8_prefill.py).
        # weights_cache: a file that keeps an iterator's weights for later sessions (`kept_weights`); it is
        # read instead of running the iterator when it is there and whole.
        self.transform = transform
        self.weights_cache = weights_cache
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
        # new weights, when it made any: {name: array}, or an iterator of (name, array) pairs made one at a time,
        # each written to a file onnxruntime reads and can drop the pages of, so they are never all in memory.
        # Anything else it returns is its own business (grouped_decode.rewrite's count).
        pairs = result.items() if isinstance(result, dict) else result if isinstance(result, Iterator) else ()
        maps, names_, values = {}, [], []
        mapped, views = kept_weights(pairs, self.weights_cache) if self.weights_cache and isinstance(result, Iterator) \
            else _file_backed(pairs)
        if views:
            maps[None] = mapped
            for name, view in views.items():
                model.graph.initializer.append(_declared(name, view))
                names_.append(name)
                values.append(ort.OrtValue.ortvalue_from_numpy(view))
        new_names = set(views)
        del result, pairs
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


def _file_backed(pairs):
    """(map or None, {name: read-only view}): the (name, array) pairs written one after another (64-byte
    aligned) to an unlinked temporary file and mapped. Once onnxruntime has packed them, release_maps drops their
    pages as it does the artifact's own weights' (anonymous memory could not be given back without losing it)."""
    import mmap
    import tempfile
    with tempfile.TemporaryFile(prefix="edgevl-weights-") as f:
        tensors = _write_pairs(f, pairs)
        if not tensors:
            return None, {}
        f.flush()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)     # the map keeps the file alive
    return mapped, _views(mapped, tensors)


def _write_pairs(f, pairs) -> list:
    """Each (name, array) written to `f`, 64-byte aligned, one at a time: [[name, offset, dtype, shape], ...]."""
    tensors = []
    for name, array in pairs:
        f.write(b"\0" * (-f.tell() % _ALIGN))
        tensors.append([name, f.tell(), array.dtype.str, list(array.shape)])
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        del array
    return tensors


def _views(mapped, tensors) -> dict:
    return {name: np.frombuffer(mapped, np.dtype(dtype), int(np.prod(shape, dtype=np.int64)), offset).reshape(shape)
            for name, offset, dtype, shape in tensors}


KEPT_DTYPES = ("|i1", "<f4")          # what a kept weight file may hold (int8 weights, float32 scales)


def kept_layout(path: Path) -> Path:
    """The layout of the kept weight file `path` (kept_weights): written last, so its presence names a whole file."""
    return path.with_name(path.name + ".json")


def kept_weights(pairs, path: Path):
    """_file_backed's (map, {name: view}) from a file that outlives the process: `path` as written by an earlier
    call when it is there and whole (then `pairs` is never iterated, so its weights are never made), else the
    pairs written to it, staged in its folder and renamed into place, with their layout in path.json (written
    last: a layout names a complete file). A folder that cannot be written: the pairs go to a temporary file."""
    import tempfile
    path = Path(path)
    found = _read_kept(path)
    if found is not None:
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-", delete=False)
    except OSError:
        return _file_backed(pairs)
    return _write_kept(pairs, staged, path)


def _read_kept(path: Path):
    """(map, views) of a kept file whose layout names it whole and in the types it may hold, else None."""
    import json
    import mmap
    try:
        layout = json.loads(kept_layout(path).read_text())
        size, tensors = layout["size"], layout["tensors"]
        for _, offset, dtype, shape in tensors:
            count = int(np.prod(shape, dtype=np.int64))
            if dtype not in KEPT_DTYPES or offset < 0 or offset + count * np.dtype(dtype).itemsize > size:
                return None
        with open(path, "rb") as f:
            if not tensors or os.fstat(f.fileno()).st_size != size:
                return None
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mapped, _views(mapped, tensors)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_kept(pairs, staged, path: Path):
    import json
    with staged as f:
        try:
            tensors = _write_pairs(f, pairs)
            size = f.tell()
        except BaseException as e:
            os.unlink(f.name)
            if isinstance(e, OSError):
                raise EdgevlError(f"could not write {path}: {e.strerror or e}.") from None
            raise
    os.replace(f.name, path)
    layout = path.with_name(f".{path.name}.json-{os.getpid()}")
    layout.write_text(json.dumps({"size": size, "tensors": tensors}))
    os.replace(layout, kept_layout(path))
    return _read_kept(path) or (None, {})


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
