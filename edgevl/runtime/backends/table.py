"""Named backends: which runner class and settings run a graph, and whether this machine can.

`edgevl run --backend NAME` picks one of these; without it, the first AVAILABLE one in
`BACKENDS`' order (fastest first) is used and named in the output. Each entry has

    available()              -> (ok, reason): a cheap probe, never imports tensorrt's engine code
    make_runner(graph, opts) -> Runner for one GraphFile (a GraphSpec, its file, model config, digest)
    build(graph, opts)       -> build engines ahead of time (`edgevl build`), where there is anything to build
    variant                  -> which graphs of an artifact it runs (GraphSpec.variant)

This table is the only place that knows execution providers or engines; the generate
loop and the pipeline only ever see Runners. Asking for a backend that cannot run here is
an EdgevlError naming what is missing (package, driver, GPU): never a silent fallback.

    ort-cpu    ONNX Runtime, CPU EP                          plain session.run, numpy in and out
    ort-cuda   ONNX Runtime, CUDA EP, IO binding             KV cache stays on the GPU between steps
    ort-trt    ONNX Runtime, TensorRT EP (+ CUDA EP)         engines cached by ORT under the engine cache
    trt        TensorRT 10 engines, execute_async_v3         engines cached by edgevl (`edgevl build`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgevl.artifact import names
from edgevl.artifact.folder import Artifact, GraphFile
from edgevl.artifact.model_config import ModelConfig
from edgevl.errors import EdgevlError
from edgevl.runtime.backends import ort_placement, packages, probe
from edgevl.runtime.backends.ort import OnnxrtRunner, OrtIoBindingRunner
from edgevl.runtime.backends.runner import Runner, activate_all
from edgevl.runtime.backends.options import BackendOptions
from edgevl.runtime.backends.ort_session import SessionFromOnnx, kept_layout
from edgevl.runtime.backends.sizing import (
    DEFAULT_ENGINE_CONTEXT,
    build_profiles,
    max_dims,
    max_tensor_bytes,
    resolve_context,
    ort_trt_profile_options,
)


# ----------------------------------------------------------------------------- availability
# Each missing piece is named with the package (and version) that supplies it here (runtime/backends/packages.py).
def _ort_provider(provider: str) -> list[str]:
    version, providers = probe.onnxruntime_info()
    if version is None:
        return ["onnxruntime is not installed (pip install onnxruntime)"]
    if provider not in providers:
        gpu = packages.onnxruntime_gpu(probe.jetson_model() is not None, probe.cuda_driver()[1])
        return [f"onnxruntime {version} here has no {provider} ({gpu})"]
    return []


def _provider_libraries(name: str) -> list[str]:
    """The NVIDIA libraries onnxruntime's provider library was linked against that do not load here."""
    lib = probe.provider_library(name)
    if lib.path is None or not lib.missing:
        return []
    return [packages.provider_libraries(lib, probe.onnxruntime_info()[0], probe.jetson_model() is not None)]


def _gpu() -> list[str]:
    reason = probe.no_gpu_reason()
    return [reason] if reason else []


def _verdict(missing: list[str]) -> tuple[bool, str]:
    return (not missing, "; ".join(missing))


def available_ort_cpu() -> tuple[bool, str]:
    return _verdict(_ort_provider("CPUExecutionProvider"))


def available_ort_cuda() -> tuple[bool, str]:
    missing = _ort_provider("CUDAExecutionProvider")
    return _verdict(missing + (_provider_libraries("cuda") if not missing else []) + _gpu())


def available_ort_trt() -> tuple[bool, str]:
    """The TensorRT EP loads the TensorRT its provider library was linked against (onnxruntime-gpu 1.31.1:
    libnvinfer.so.10, so TensorRT 10.x for CUDA 13; an installed 11.x does not count)."""
    missing = _ort_provider("TensorrtExecutionProvider")
    missing += (_provider_libraries("tensorrt") if not missing else []) + _gpu()
    if not probe.module_available("onnx"):
        missing.append("the onnx package is missing (pip install onnx; it inlines edgevl.MRoPE)")
    return _verdict(missing)


def available_trt() -> tuple[bool, str]:
    missing = []
    jetson, driver = probe.jetson_model() is not None, probe.cuda_driver()[1]
    version = probe.tensorrt_version() if probe.module_available("tensorrt") else None
    if version is None:
        missing.append(f"TensorRT's Python package is missing ({packages.tensorrt_python(jetson, driver)})")
    elif int(version.split(".")[0]) < 10:
        missing.append(f"TensorRT {version} is too old (the trt backend needs TensorRT 10 or newer: "
                       f"{packages.tensorrt_python(jetson, driver)})")
    if probe.cuda_python_module() is None:
        missing.append(f"cuda-python is missing ({packages.cuda_python(jetson, probe.cuda_runtime_version(), driver)})")
    return _verdict(missing + _gpu())


# ----------------------------------------------------------------------------- runner factories
# Each factory builds a Runner for one GraphFile (its GraphSpec, file, model config and digest): it never
# reads a manifest of its own, so graphs outside an artifact (quantize's candidates) run everywhere.
def _cuda_options(opts: BackendOptions) -> dict:
    # TF32 only where the user allowed reduced precision: fp32 exports stay fp32 (verified to 1e-4).
    return {"device_id": opts.device_id, "use_tf32": 1 if opts.precision != "graph" else 0}


def _disabled_optimizers(graph: GraphFile) -> tuple[str, ...]:
    # onnxruntime 1.32's QDQS8ToU8Transformer rewrites int8 QDQ activations to uint8 but keeps opset 21+
    # QuantizeLinear's output_dtype, and the session then refuses the graph ("output_dtype INT8 does not match
    # y_zero_point type UINT8"): static int8 standard graphs (opset 23) need it off.
    return ("QDQS8ToU8Transformer",) if graph.spec.opset >= 21 and graph.spec.precision == "int8" else ()


def make_ort_cpu(graph: GraphFile, opts: BackendOptions) -> Runner:
    # --fast-load skips pre-packing of float weights only. Quantized kernels need their packed layout
    # (2b-l4, 2-core EPYC, without it: int8 decode 18 -> 39 ms/token, int4 MatMulNBits 15 -> 2177).
    prepack = opts.prepack or not graph.spec.float_weights
    # The vision graph's activations vary with every image size: onnxruntime's arena would keep each size's
    # blocks and fragment (2b-l4, four large photos of different sizes: 971 MB held; one 2016x1512 photo:
    # 1.75 GB), malloc instead costs 14 % of a 448x448 int8 encode (221 vs 196 ms). So the arena stays, and is
    # shrunk after a call whose input shapes are new (121 MB / 87 MB held; repeated sizes at the arena's
    # speed). Measured on a 2-core EPYC.
    transform, spare = _grouped_decode(graph)
    runner = OnnxrtRunner(SessionFromOnnx(graph.path, providers=("CPUExecutionProvider",),
                                          intra_op_threads=opts.threads, prepack=prepack,
                                          disabled_optimizers=_disabled_optimizers(graph), transform=transform),
                          name=f"ort-cpu:{graph.name}", shrink_on_new_shapes=graph.spec.kind == names.VISION,
                          kv_spare_positions=spare)
    if opts.int8_prefill or (opts.int8_prefill is None and graph.spec.int8_prefill):
        return _with_int8_prefill(runner, graph, opts)
    return runner


def _with_int8_prefill(runner, graph: GraphFile, opts: BackendOptions):
    """`runner` with its prompt calls on an int8 copy of a 4-bit decoder (runtime/backends/int8_prefill.py); as it is
    for graphs without 4-bit matmuls (the vision encoder, fp32 / int8 decoders). Asked for (--int8-prefill), or by
    default where the quantizer measured it (the graph's int8_prefill) and int8_prefill.by_default agrees."""
    if graph.spec.kind != names.DECODER or graph.spec.kv_cache != names.IN_PLACE:
        return runner
    import onnx

    from edgevl.runtime.backends import int8_prefill
    vocab = graph.config.vocab_size
    nodes = int8_prefill.candidates(onnx.load(str(graph.path), load_external_data=False), vocab)
    if not nodes:
        opts.log(f"--int8-prefill: {graph.name} has no 4-bit matmuls; its prompts run as exported")
        return runner
    if opts.int8_prefill is None:
        why_not = int8_prefill.by_default(nodes, int8_prefill.int8_dot_products(),
                                          probe.meminfo_bytes("MemAvailable"))
        if why_not:
            opts.log(f"{graph.name}: prompts run on its 4-bit weights ({why_not}; --int8-prefill turns it on)")
            return runner
        opts.log(f"{graph.name}: prompts run on int8 copies of its 4-bit weights, as measured when it was quantized "
                 f"(--no-int8-prefill turns it off)")
    kept = _kept_copies(graph, opts)
    prefill = OnnxrtRunner(SessionFromOnnx(graph.path, providers=("CPUExecutionProvider",),
                                           intra_op_threads=opts.threads, prepack=True,
                                           disabled_optimizers=_disabled_optimizers(graph),
                                           transform=int8_prefill.prefill_rewrite(graph.path.parent, vocab),
                                           weights_cache=kept),
                           name=f"ort-cpu:{graph.name}:int8-prefill", kv_spare_positions=runner.kv_spare_positions)
    return int8_prefill.PrefillSplitRunner(runner, prefill)


def _kept_copies(graph: GraphFile, opts: BackendOptions):
    """The file that keeps `graph`'s int8 copies for later loads (read when there: the requantization, most of the
    load, is skipped), or None where opts.keep_int8_copies is off."""
    if not opts.keep_int8_copies:
        return None
    from edgevl.runtime.backends import int8_prefill
    path = int8_prefill.kept_copies(graph, opts.cache)
    if kept_layout(path).exists():
        opts.log(f"{graph.name}: int8 copies read from {path}")
    else:
        opts.log(f"{graph.name}: int8 copies made once and kept in {path} for later loads")
    return path


def _grouped_decode(graph: GraphFile):
    """(graph transform, spare KV positions) for an in-place decoder on the CPU: its decode steps read each KV
    head once (runtime/backends/grouped_decode.py); (None, 0) for other graphs or without the onnx package."""
    if graph.spec.kind != names.DECODER or graph.spec.kv_cache != names.IN_PLACE:
        return None, 0
    try:
        import onnx
    except ImportError:
        return None, 0
    from edgevl.runtime.backends import grouped_decode
    spare = grouped_decode.spare_positions(onnx.load(str(graph.path), load_external_data=False))
    return (grouped_decode.rewrite, spare) if spare else (None, 0)


def make_ort_cuda(graph: GraphFile, opts: BackendOptions) -> Runner:
    """ONNX Runtime's CUDA EP, after checking the graph against its kernels (runtime/backends/ort_placement.py): a node with
    no CUDA kernel for its types is refused in one sentence instead of running on the CPU."""
    placement = ort_placement.check_for_cuda(graph.path, str(graph.path.parent), graph.spec.precision)
    # --cuda-graph: only for the in-place decoder, whose decode steps have fixed shapes and addresses
    # (static KV buffers, inputs copied into fixed buffers, total_sequence_length = max_context).
    graphed = opts.cuda_graph and graph.spec.kv_cache == names.IN_PLACE
    if placement.crossings:
        where = placement.crossings[0]
        text = (f"{graph.name} copies {where.value} {'to the GPU' if where.to_device else 'to the host'} for "
                f"{where.op} at every step ({len(placement.crossings)} such copies)")
        if graphed:
            raise EdgevlError(f"--cuda-graph: {text}, and onnxruntime captures no graph with copies; re-export the "
                              f"artifact with this edgevl.")
        opts.log(f"ort-cuda: {text}")
    cuda = {**_cuda_options(opts), **({"enable_cuda_graph": "1"} if graphed else {})}
    # Nothing predicted on the CPU: let onnxruntime refuse a session that would put a node there after all (the
    # entry refuses harmless shape arithmetic on the CPU too, hence only then; and the CPU EP must not be named).
    strict = not placement.cpu_nodes
    providers = [("CUDAExecutionProvider", cuda)] + ([] if strict else ["CPUExecutionProvider"])
    entries = (("session.disable_cpu_ep_fallback", "1"),) if strict else ()
    return OrtIoBindingRunner(SessionFromOnnx(graph.path, providers=providers, intra_op_threads=opts.threads,
                                              disabled_optimizers=_disabled_optimizers(graph), config_entries=entries),
                              name=f"ort-cuda:{graph.name}", device="cuda", device_id=opts.device_id,
                              static_decode=graphed)


def _device(opts: BackendOptions) -> probe.GpuInfo:
    gpus = probe.gpus()
    if not 0 <= opts.device_id < len(gpus):
        raise EdgevlError(f"--device {opts.device_id}: this machine has {len(gpus)} GPU(s).")
    return gpus[opts.device_id]


def ort_trt_provider_options(graph: GraphFile, opts: BackendOptions) -> dict:
    """TensorRT EP options but the cache paths: precision flags and explicit profiles from the GraphSpec."""
    profiles = build_profiles(graph.spec.kind, graph.spec.inputs, opts.limits(graph.config), graph.config)
    fp16_graph = any(i.dtype == "float16" for i in graph.spec.inputs)
    return {"device_id": opts.device_id, "trt_fp16_enable": fp16_graph or opts.precision in ("fp16", "int8"),
            "trt_int8_enable": opts.precision == "int8", **ort_trt_profile_options(profiles)}


def make_ort_trt(graph: GraphFile, opts: BackendOptions) -> Runner:
    """ORT's TensorRT EP over the graph with its custom ops inlined; ORT caches the engines in a folder keyed
    like trt's engines (GPU, compute capability, TensorRT, graph digest, options) plus the ORT version."""
    from edgevl.runtime.backends.trt import engine_cache_key, inline_local_functions
    source = graph.path
    if graph.spec.custom_ops:
        source = inline_local_functions(source, opts.cache / "inlined" / graph.digest[:16], log=opts.log)
    options = ort_trt_provider_options(graph, opts)
    gpu = _device(opts)
    key = engine_cache_key(graph.digest, gpu.name, gpu.compute_capability, probe.tensorrt_version() or "unknown",
                           {"onnxruntime": probe.onnxruntime_info()[0], **options})
    cache_dir = str(opts.cache / "ort-trt" / f"{graph.name}-{key}")
    options.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache_dir, trt_timing_cache_enable=True,
                   trt_timing_cache_path=cache_dir)
    providers = [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", _cuda_options(opts)),
                 "CPUExecutionProvider"]
    return OrtIoBindingRunner(SessionFromOnnx(source, providers=providers), name=f"ort-trt:{graph.name}",
                              device="cuda", device_id=opts.device_id)


def build_ort_trt(graph: GraphFile, opts: BackendOptions) -> None:
    """ORT's TensorRT EP builds its engines when the session is created (explicit profiles): do that once."""
    runner = make_ort_trt(graph, opts)
    runner.activate()
    runner.deactivate()


def trt_engine_loader(graph: GraphFile, opts: BackendOptions):
    """(EngineFromCache loader for a graph, its profiles, its buffer sizes) for the trt backend."""
    from edgevl.runtime.backends import trt
    limits = opts.limits(graph.config)
    spec = graph.spec
    profiles = build_profiles(spec.kind, spec.inputs, limits, graph.config)
    env = max_dims(spec.kind, limits, graph.config)
    max_bytes = {v.name: max_tensor_bytes(v, env) for v in (*spec.inputs, *spec.outputs)}
    gpu = _device(opts)
    build_options = trt.BuildOptions(precision=opts.precision)
    key = trt.engine_cache_key(graph.digest, gpu.name, gpu.compute_capability, probe.tensorrt_version(),
                               build_options.key(profiles))
    describe = {"graph": graph.name, "file": str(graph.path), "graph_sha256": graph.digest, "gpu": gpu.name,
                "compute_capability": gpu.sm, "tensorrt": probe.tensorrt_version(), **build_options.key(profiles)}
    build = trt.EngineFromOnnx(graph.path, profiles, build_options, log=opts.log)
    cache = trt.EngineFromCache(opts.cache / "trt", f"{graph.name}-{key}", build, describe, log=opts.log)
    return cache, profiles, max_bytes


def make_trt(graph: GraphFile, opts: BackendOptions) -> Runner:
    from edgevl.runtime.backends import trt
    cache, profiles, max_bytes = trt_engine_loader(graph, opts)
    return trt.TrtRunner(trt.EngineFromBytes(cache), profiles, max_bytes, name=f"trt:{graph.name}",
                         memory_factory=lambda: trt.CudaMemory(opts.device_id))


def build_trt(graph: GraphFile, opts: BackendOptions) -> None:
    cache, _, _ = trt_engine_loader(graph, opts)
    cache().close()                                       # builds and stores unless already cached


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    available: Callable[[], tuple[bool, str]]
    factory: Callable[[GraphFile, BackendOptions], Runner]
    build: Callable[[GraphFile, BackendOptions], None] | None = None   # None: nothing to build ahead of time
    engine_limits: bool = False                                    # bounded by --max-context etc.
    # Load the graphs of an artifact at the same time. Not where loading may build engines: two
    # TensorRT builders at once double the builder's GPU workspace (too much on a Jetson).
    concurrent_load: bool = True
    variants: tuple[str, ...] = ("ort", "standard")               # graph variants it runs, preferred first
    default_context: int | None = None     # KV positions without --max-context (None: the model's context)


# In preference order: the default is the first available one.
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("trt", "TensorRT 10 engines (edgevl build), KV cache on the GPU", available_trt, make_trt, build_trt,
                engine_limits=True, concurrent_load=False, variants=("standard",)),
    BackendSpec("ort-trt", "ONNX Runtime TensorRT EP, KV cache on the GPU", available_ort_trt, make_ort_trt,
                build_ort_trt, engine_limits=True, concurrent_load=False, variants=("standard",)),
    BackendSpec("ort-cuda", "ONNX Runtime CUDA EP with IO binding, KV cache preallocated on the GPU",
                available_ort_cuda, make_ort_cuda, default_context=DEFAULT_ENGINE_CONTEXT),
    BackendSpec("ort-cpu", "ONNX Runtime on the CPU, KV cache written in place", available_ort_cpu, make_ort_cpu),
)}


@dataclass(frozen=True)
class Backend:
    """A backend bound to the user's options: what the pipeline holds."""

    spec: BackendSpec
    options: BackendOptions = BackendOptions()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    def make_runner(self, graph: GraphFile) -> Runner:
        return self.spec.factory(graph, self.options)

    def load(self, graphs: list[GraphFile]) -> list[Runner]:
        """Runners for `graphs`, activated (at the same time where the backend allows)."""
        runners = [self.make_runner(graph) for graph in graphs]
        activate_all(runners, concurrently=self.spec.concurrent_load)
        return runners

    def graphs(self, artifact: Artifact) -> list[GraphFile]:
        """The artifact's vision and decoder graphs of the first variant this backend runs."""
        variant = next((v for v in self.spec.variants if v in artifact.manifest.variants), None)
        if variant is None:
            raise EdgevlError(f"{artifact.path} holds {', '.join(artifact.manifest.variants)} graphs, and backend "
                              f"{self.name} runs {' or '.join(self.spec.variants)} graphs; re-export with "
                              f"`edgevl export --variant {self.spec.variants[0]}`.")
        return [artifact.graph(kind, variant) for kind in names.GRAPH_KINDS]

    def build(self, graph: GraphFile) -> bool:
        """Build what can be built ahead of time; False when this backend has nothing to build."""
        if self.spec.build is None:
            return False
        self.spec.build(graph, self.options)
        return True

    def context_limit(self, config: ModelConfig) -> int:
        """Most KV positions this backend accepts for a model: sizing.resolve_context's one rule, with this
        backend's default (engines are built for a fixed maximum)."""
        default = DEFAULT_ENGINE_CONTEXT if self.spec.engine_limits else self.spec.default_context
        return resolve_context(config, self.options.max_context, default)


def availability() -> dict[str, tuple[bool, str]]:
    """Every backend's (ok, reason), in preference order."""
    return {name: spec.available() for name, spec in BACKENDS.items()}


def get_backend(name: str | None = None, options: BackendOptions | None = None) -> Backend:
    """The named backend, or the fastest available one; EdgevlError naming what is missing otherwise."""
    options = options or BackendOptions()
    if name is None:
        for spec in BACKENDS.values():
            if spec.available()[0]:
                return Backend(spec, options)
        raise EdgevlError("no backend can run here: " + "; ".join(f"{n}: {r}" for n, (_, r) in availability().items()))
    if name not in BACKENDS:
        raise EdgevlError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    ok, reason = BACKENDS[name].available()
    if not ok:
        usable = [n for n, (good, _) in availability().items() if good]
        raise EdgevlError(f"backend {name} is not available here: {reason}. Available here: "
                          f"{', '.join(usable) or 'none'}.")
    return Backend(BACKENDS[name], options)
