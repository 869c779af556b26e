"""Native TensorRT 10 and 11 (named-tensor API): engines from the ONNX graphs, cached, run on a CUDA stream.

Loaders build, the runner runs (Polygraphy's split):

    EngineFromOnnx(onnx, profiles, BuildOptions)   -> serialized engine (builds: minutes for a 2B decoder)
    EngineFromCache(dir, key, build)               -> <dir>/<key>.engine memory-mapped, or build() once and store
    EngineFromBytes(load)                          -> ICudaEngine (trt.Runtime.deserialize_cuda_engine)
    TrtRunner(load_engine, profiles, io)           -> the Runner interface; execute_async_v3 on one stream

The cache key (`engine_cache_key`) covers everything an engine depends on: GPU name and compute
capability, TensorRT version, the sha256 of the graph's files (from the manifest) and the build
options (precision, profiles). An engine is never reused across any of them.

M-RoPE: TensorRT's ONNX parser imports model-local functions (onnx-tensorrt changelog, TensorRT 9.0:
"Added support for ONNX local functions"), so `trt` parses decoder.onnx as exported and builds
each edgevl.MRoPE node from its body (TensorRT >= 10.7 would prefer a plugin registered under that
op name: the place for a fused kernel). ONNX Runtime's TensorRT EP hands TensorRT sub-graphs it
cuts itself, so for `ort-trt` the functions are inlined first (`inline_local_functions`).

Versions: every TensorRT name used here exists in 10.3 (JetPack 6), 10.13 .. 10.16 and 11.0 .. 11.4, except
BuilderFlag.FP16 / INT8, which TensorRT 11 removed (its networks are always strongly typed) and which are only
touched where they exist (`builder_flags`). tests/runtime/backends/test_trt.py checks that against each version's
recorded API (tests/data/trt_api/, benchmarks/trt_api_surface.py).

`tensorrt` and `cuda-python` are imported only inside the loaders and `CudaMemory`; everything else
here is plain Python so that the runner's logic is tested on a CPU with stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgevl.artifact import names
from edgevl.artifact.folder import staged_folder
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.cuda_memory import CudaMemory
from edgevl.runtime.backends.tensors import DeviceTensor, TensorMeta, to_host
from edgevl.runtime.backends.sizing import Profile, select_profile

# TensorRT DataType member names -> numpy (BF16/FP8/INT4 have no numpy type: not graph I/O here).
TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
              "INT8": np.int8, "UINT8": np.uint8}


def trt_dtype_to_numpy(name: str) -> np.dtype:
    if name not in TRT_DTYPES:
        raise EdgevlError(f"TensorRT I/O type {name} has no numpy equivalent; edgevl graphs use fp32/fp16/int64.")
    return np.dtype(TRT_DTYPES[name])


# ----------------------------------------------------------------------------- cache keys
def engine_cache_key(graph_sha: str, gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                     options: dict) -> str:
    """Stable hex key: changes with the GPU, its compute capability, TensorRT, the graph (GraphFile.digest) or
    any option."""
    material = {"graph": graph_sha, "gpu": gpu_name, "sm": list(compute_capability), "tensorrt": trt_version,
                "options": options}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=list).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BuildOptions:
    """precision: "graph" = strongly typed (each layer in the ONNX graph's own type: an fp16 export runs in fp16;
    TF32 off, so an fp32 graph computes in fp32), "fp16" = weakly typed with FP16 allowed (fp32 exports),
    "int8" = INT8+FP16 allowed (Q/DQ-quantized exports). "fp16" and "int8" exist on TensorRT 10 only: TensorRT 11
    builds every network strongly typed (`builder_flags`). workspace_bytes 0 = TensorRT's default (the whole GPU)."""

    precision: str = "graph"
    workspace_bytes: int = 0

    def __post_init__(self):
        if self.precision not in ("graph", "fp16", "int8"):
            raise EdgevlError(f"precision must be graph, fp16 or int8, not {self.precision!r}.")

    def key(self, profiles: list[Profile]) -> dict:
        return {**asdict(self), "profiles": [[p.name, sorted(p.shapes.items())] for p in profiles]}


@dataclass(frozen=True)
class BuilderFlags:
    """What a precision means to one TensorRT: the network flag and the builder flags to set and to clear."""

    strongly_typed: bool
    set: tuple[str, ...]
    clear: tuple[str, ...]


# What to build instead on TensorRT 11, where precision comes from the graph alone.
_GRAPH_PRECISION = {"fp16": "an fp16 artifact (edgevl quantize FP32_EXPORT -o OUT --recipe fp16, or edgevl export "
                            "--dtype fp16)",
                    "int8": "a static int8 artifact with Q/DQ nodes (edgevl quantize FP32_EXPORT -o OUT --recipe int8 "
                            "--activations static)"}


def builder_flags(precision: str, flags: set[str], version: str) -> BuilderFlags:
    """The flags for `precision` given the BuilderFlag members this TensorRT has (`flags`).

    graph: a strongly typed network, TF32 cleared (TensorRT enables it by default: fp32 matmuls would run with
    10-bit mantissas, where edgevl verifies fp32 graphs to 1e-4). fp16 / int8: TensorRT 10's weakly typed
    network with those flags (TF32 left on: reduced precision was asked for); TensorRT 11 has no such flags (it
    removed them; a network is always strongly typed), so the graph itself must carry the precision."""
    if precision == "graph":
        return BuilderFlags(True, (), ("TF32",) if "TF32" in flags else ())
    wanted = ("FP16",) if precision == "fp16" else ("FP16", "INT8")
    if not set(wanted) <= flags:
        raise EdgevlError(f"--precision {precision}: TensorRT {version} builds every network strongly typed (its "
                          f"BuilderFlag has no {' or '.join(wanted)}), so precision comes from the graph: build "
                          f"{_GRAPH_PRECISION[precision]} with --precision graph.")
    return BuilderFlags(False, wanted, ())


# ----------------------------------------------------------------------------- M-RoPE inlining
def inline_local_functions(src: Path, dst_dir: Path, log=print) -> Path:
    """dst_dir/<src name>: `src` with every model-local function (edgevl.MRoPE) replaced by its body.

    Done once per graph digest (dst_dir names it); written to a temporary sibling folder and renamed,
    so an interrupted run leaves nothing half-written. Needs the `onnx` package (pure wheels on
    aarch64 too) and holds the whole graph in memory once.
    """
    dst = dst_dir / src.name
    if dst.exists():
        return dst
    try:
        import onnx
        from onnx import inliner

        from edgevl.artifact.onnx_files import save_graph
    except ImportError:
        raise EdgevlError("ort-trt inlines the edgevl.MRoPE function before TensorRT sees the graph and needs the "
                          "onnx package for it: pip install onnx.") from None
    log(f"inlining model-local functions of {src.name} (once per artifact) -> {dst_dir}")
    model = inliner.inline_local_functions(onnx.load(str(src)))
    used = {n.domain for n in model.graph.node}
    keep = [imp for imp in model.opset_import if imp.domain in used or imp.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    with staged_folder(dst_dir, force=True) as tmp:
        save_graph(model, tmp / src.name, check=False)
    return dst


# ----------------------------------------------------------------------------- loaders
def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        from edgevl.runtime.backends import packages, probe
        hint = packages.tensorrt_python(probe.jetson_model() is not None, probe.cuda_driver()[1])
        raise EdgevlError(f"the trt backend needs TensorRT's Python package ({hint}).") from None
    return tensorrt


def _progress_monitor(trt, log):
    """A trt.IProgressMonitor printing the top-level build phases and their steps."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps, self.top = {}, set()

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                self.top.add(phase_name)
                log(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            if phase_name in self.top:
                log(f"  {phase_name}: {step + 1}/{self.steps.get(phase_name, '?')}")
            return True                                   # False would cancel the build

        def phase_finish(self, phase_name):
            self.top.discard(phase_name)

    return Monitor()


class EngineFromOnnx:
    """Loader: parse an ONNX file (external data beside it) and build a serialized engine."""

    def __init__(self, path: Path, profiles: list[Profile], options: BuildOptions, log=print):
        self.path, self.profiles, self.options, self.log = Path(path), profiles, options, log

    def __call__(self):
        trt = import_tensorrt()
        precision = builder_flags(self.options.precision, set(trt.BuilderFlag.__members__), trt.__version__)
        self._check_ops(trt.__version__)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # TensorRT 11 ignores STRONGLY_TYPED (every network is); 10.x needs it for the graph's own types
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision.strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EdgevlError(f"TensorRT's ONNX parser rejected {self.path.name}: {errors}")
        config = builder.create_builder_config()
        if self.options.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.options.workspace_bytes)
        for name in precision.set:
            config.set_flag(getattr(trt.BuilderFlag, name))
        for name in precision.clear:
            config.clear_flag(getattr(trt.BuilderFlag, name))
        for profile in self.profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.shapes.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        monitor = _progress_monitor(trt, self.log)
        if monitor is not None:
            config.progress_monitor = monitor
        self.log(f"building a TensorRT {trt.__version__} engine for {self.path.name} "
                 f"({', '.join(p.name for p in self.profiles)} profiles, precision {self.options.precision})")
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EdgevlError(f"TensorRT could not build an engine for {self.path.name} (its messages are above).")
        self.log(f"built {self.path.name} in {time.perf_counter() - t0:.0f} s")
        return serialized                                 # IHostMemory: a buffer, written and read as is


    def _check_ops(self, version: str) -> None:
        """A sentence, before TensorRT parses anything, when this TensorRT's parser lacks an op of the graph
        (runtime/backends/trt_parser.py); skipped without the onnx package (the parser then reports it)."""
        try:
            import onnx
        except ImportError:
            return
        from edgevl.runtime.backends import trt_parser
        problems = trt_parser.check(onnx.load(str(self.path), load_external_data=False), version)
        sentence = trt_parser.refusal(self.path.name, version, problems)
        if sentence:
            raise EdgevlError(sentence)


class EngineFromCache:
    """Loader: <cache_dir>/<key>.engine if present (memory-mapped), else build() once, store, return it."""

    def __init__(self, cache_dir: Path, key: str, build: Callable, describe: dict | None = None, log=print):
        self.path = Path(cache_dir) / f"{key}.engine"
        self.build, self.describe, self.log = build, describe or {}, log

    def __call__(self):
        if not self.path.exists():
            blob = self.build()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path)                    # atomic: a reader never sees half an engine
            self.path.with_suffix(".json").write_text(json.dumps(self.describe, indent=2, default=list) + "\n")
            self.log(f"cached {self.path}")
        with open(self.path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class EngineFromBytes:
    """Loader: deserialize an engine; keeps the trt.Runtime alive as long as the loader lives."""

    def __init__(self, load: Callable):
        self.load, self.runtime = load, None

    def __call__(self):
        trt = import_tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        blob = self.load()
        engine = self.runtime.deserialize_cuda_engine(blob)
        if hasattr(blob, "close"):
            blob.close()                                  # the engine lives in GPU memory now
        if engine is None:
            raise EdgevlError("TensorRT could not load the cached engine (another TensorRT version or GPU?); "
                              "delete it and rebuild with `edgevl build`.")
        return engine


# ----------------------------------------------------------------------------- runner
class TrtRunner:
    """Runs a TensorRT engine: one execution context, one stream, every buffer allocated once.

    Buffers are sized at activate() from the manifest's dims at their largest over all profiles
    (`max_bytes`: name -> bytes). KV outputs get two buffers each and alternate: a step reads
    past_key_values.{i}.* where the previous step wrote present.{i}.* (bound by address, no copy)
    and writes the other buffer. A returned DeviceTensor is therefore valid until the next-but-one
    call, which is how the generate loop uses it. Host inputs are copied in on the stream, host
    outputs copied out, then the stream is synchronized once per call.
    """

    device, device_id = "cuda", 0
    kv_spare_positions = 0
    static_decode = False

    def __init__(self, load_engine: Callable, profiles: list[Profile], max_bytes: dict[str, int],
                 name: str = "trt", keep_on_device: tuple[str, ...] = (names.PRESENT_PREFIX,),
                 memory_factory=CudaMemory):
        self.load_engine, self.profiles, self.max_bytes = load_engine, profiles, max_bytes
        self.name, self.keep_on_device, self.memory_factory = name, tuple(keep_on_device), memory_factory
        self.engine = None

    # -- lifecycle
    def activate(self) -> None:
        if self.engine is not None:
            return
        self.mem = self.memory_factory()
        self.engine = self.load_engine()
        e = self.engine
        tensors = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.inputs = [n for n in tensors if e.get_tensor_mode(n).name == "INPUT"]
        self.outputs = [n for n in tensors if e.get_tensor_mode(n).name == "OUTPUT"]
        self.dtypes = {n: trt_dtype_to_numpy(e.get_tensor_dtype(n).name) for n in tensors}
        if e.num_optimization_profiles != len(self.profiles):
            raise EdgevlError(f"the engine has {e.num_optimization_profiles} profiles, edgevl expected "
                              f"{len(self.profiles)}; rebuild it with `edgevl build`.")
        self.kv = {i: names.present_for(i) for i in self.inputs
                   if names.is_past(i) and names.present_for(i) in self.outputs}
        self.stream = self.mem.stream()
        self.context = e.create_execution_context()
        self.profile = 0
        self.buffers = {n: self.mem.alloc(self.max_bytes[n]) for n in tensors if n not in self.kv}
        for out in self.kv.values():                      # present.* : two alternating buffers
            self.buffers[out] = (self.buffers[out], self.mem.alloc(self.max_bytes[out]))

    def deactivate(self) -> None:
        if self.engine is None:
            return
        self.mem.sync(self.stream)
        for b in self.buffers.values():
            for ptr in (b if isinstance(b, tuple) else (b,)):
                self.mem.free(ptr)
        self.mem.destroy(self.stream)
        self.context = self.engine = self.buffers = None

    def allocate(self, shape: tuple[int, ...], dtype):
        raise EdgevlError(f"{self.name} runs graphs whose cache grows by concatenation; it has no in-place buffers.")

    def input_metadata(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(self.dtypes[n], tuple(self.engine.get_tensor_shape(n))) for n in self.inputs}

    # -- inference
    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        if bindings:
            raise EdgevlError(f"{self.name} runs graphs whose cache grows by concatenation, not in place.")
        if self.engine is None:
            raise RuntimeError(f"runner {self.name} used before activate()")
        ctx, handle = self.context, self.mem.handle(self.stream)
        shapes = {n: tuple(int(d) for d in feed[n].shape) for n in self.inputs}
        p = select_profile(self.profiles, shapes)
        if p != self.profile:
            ctx.set_optimization_profile_async(p, handle)
            self.profile = p
        write_slot = {}                                   # present.* -> the buffer this call writes
        for name in self.inputs:
            value = feed[name]
            if not ctx.set_input_shape(name, shapes[name]):
                raise EdgevlError(f"{self.name}: TensorRT refused {name} with shape {list(shapes[name])}.")
            if isinstance(value, DeviceTensor) and value.owner is self:
                ptr, slot = value.handle                  # last call's present.*: bind in place
            else:
                array = np.ascontiguousarray(to_host(value), dtype=self.dtypes[name])
                slot = 1
                ptr = self.buffers[self.kv[name]][1] if name in self.kv else self.buffers[name]
                if array.nbytes:
                    self.mem.h2d(ptr, array, self.stream)
            if name in self.kv:
                write_slot[self.kv[name]] = 1 - slot
            ctx.set_tensor_address(name, ptr)
        addresses = {}
        for name in self.outputs:
            buf = self.buffers[name]
            addresses[name] = (buf[write_slot.get(name, 0)], write_slot.get(name, 0)) if isinstance(buf, tuple) \
                else (buf, None)
            ctx.set_tensor_address(name, addresses[name][0])
        if not ctx.execute_async_v3(handle):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (its messages are above).")
        results = {}
        for name in self.outputs:
            shape, dtype = tuple(int(d) for d in ctx.get_tensor_shape(name)), self.dtypes[name]
            ptr, slot = addresses[name]
            if name.startswith(self.keep_on_device):
                results[name] = DeviceTensor((ptr, slot), shape, dtype, self, self._downloader(ptr, shape, dtype))
            else:
                results[name] = np.empty(shape, dtype)
                if results[name].nbytes:
                    self.mem.d2h(results[name], ptr, self.stream)
        self.mem.sync(self.stream)
        return results

    def _downloader(self, ptr: int, shape: tuple, dtype) -> Callable[[], np.ndarray]:
        def download() -> np.ndarray:
            out = np.empty(shape, dtype)
            if out.nbytes:
                self.mem.d2h(out, ptr, self.stream)
                self.mem.sync(self.stream)
            return out
        return download
