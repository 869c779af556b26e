"""Stand-ins for TensorRT and CUDA, so TrtRunner's logic (profiles, buffers, KV alternation) runs on a CPU:
`HostMemory` replaces CudaMemory, `FakeEngine`/`FakeContext` an ICudaEngine and its execution context
(the graph itself runs in ONNX Runtime, reading and writing HostMemory by address).

`fake_tensorrt(version, ...)` is a `tensorrt` module with exactly one version's recorded Python API
(tests/data/trt_api/<version>.json, written by benchmarks/trt_api_surface.py from the real bindings): a name
trt.py uses that this version lacks raises AttributeError, as it would on that TensorRT."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np

from edgevl.runtime.backends import sizing, trt


class HostMemory:
    """Stand-in for CudaMemory: 'device' buffers are numpy byte arrays keyed by fake addresses."""

    def __init__(self):
        self.blocks, self.next, self.h2d_calls = {}, 1 << 20, []

    def stream(self):
        return "stream"

    def handle(self, stream):
        return 7

    def alloc(self, nbytes):
        self.next += 1 << 20
        self.blocks[self.next] = np.zeros(max(nbytes, 1), np.uint8)
        return self.next

    def free(self, ptr):
        del self.blocks[ptr]

    def h2d(self, ptr, array, stream):
        self.h2d_calls.append(ptr)
        self.blocks[ptr][:array.nbytes] = array.reshape(-1).view(np.uint8)

    def d2h(self, array, ptr, stream):
        array.reshape(-1).view(np.uint8)[:] = self.blocks[ptr][:array.nbytes]

    def sync(self, stream):
        pass

    def destroy(self, stream):
        pass


class FakeEngine:
    """Stand-in for an ICudaEngine: the graph runs in ONNX Runtime, reading and writing HostMemory."""

    TYPES = {"tensor(float)": "FLOAT", "tensor(int64)": "INT64", "tensor(float16)": "HALF"}

    def __init__(self, path, memory, profiles):
        import onnxruntime as ort
        # (onnxruntime stands in for TensorRT, whose int8 path has no uint8 rewrite: see backends._disabled_optimizers)
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["QDQS8ToU8Transformer"])
        self.memory, self.num_optimization_profiles = memory, len(profiles)
        self.io = {v.name: ("INPUT", v) for v in self.session.get_inputs()}
        self.io.update({v.name: ("OUTPUT", v) for v in self.session.get_outputs()})
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return types.SimpleNamespace(name=self.io[name][0])

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.TYPES[self.io[name][1].type])

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profiles_set = engine, {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.profiles_set.append(index)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def execute_async_v3(self, stream):
        e, mem = self.engine, self.engine.memory
        inputs = [n for n in e.names if e.io[n][0] == "INPUT"]
        outputs = [n for n in e.names if e.io[n][0] == "OUTPUT"]
        assert not {self.addresses[n] for n in inputs} & {self.addresses[n] for n in outputs}, "aliased I/O"
        feed = {}
        for n in inputs:
            dtype = trt.trt_dtype_to_numpy(e.get_tensor_dtype(n).name)
            count = int(np.prod(self.shapes[n]))
            feed[n] = mem.blocks[self.addresses[n]][:count * dtype.itemsize].view(dtype).reshape(self.shapes[n]).copy()
        for n, value in zip(outputs, e.session.run(outputs, feed)):
            self.shapes[n] = value.shape
            block = mem.blocks[self.addresses[n]]
            assert value.nbytes <= block.nbytes, f"{n} outgrew its buffer"
            block[:value.nbytes] = value.reshape(-1).view(np.uint8)
        return True


def fake_trt_runners(art, limits):
    """Activated TrtRunners for both graphs of an artifact over FakeEngines, and their HostMemory."""
    runners, memories = {}, {}
    for graph in ("vision", "decoder"):
        spec = art.manifest.graph(graph)
        profiles = sizing.build_profiles(graph, spec.inputs, limits, art.config)
        env = sizing.max_dims(graph, limits, art.config)
        max_bytes = {v.name: sizing.max_tensor_bytes(v, env) for v in (*spec.inputs, *spec.outputs)}
        memories[graph] = mem = HostMemory()
        runners[graph] = trt.TrtRunner(lambda g=graph, m=mem, p=profiles: FakeEngine(art.graph_path(g), m, p),
                                       profiles, max_bytes, name=f"fake-trt:{graph}", memory_factory=lambda m=mem: m)
        runners[graph].activate()
    return runners, memories


# ----------------------------------------------------------------------------- a TensorRT with one version's API
TRT_API = Path(__file__).parent / "data" / "trt_api"


def recorded_versions() -> list[str]:
    """The TensorRT versions whose Python API is recorded (benchmarks/trt_api_surface.py), oldest first."""
    return sorted((p.stem for p in TRT_API.glob("*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))


def surface(version: str) -> dict:
    return json.loads((TRT_API / f"{version}.json").read_text())


class Checked:
    """An object with exactly the public attributes a recorded TensorRT class has: reading or setting any other
    raises AttributeError, as the real bindings of that version would."""

    def __init__(self, api: dict, cls: str, target):
        object.__setattr__(self, "_names", frozenset(api["classes"][cls]))
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name):
        if not name.startswith("_") and name not in self._names:
            raise AttributeError(f"'{self._cls}' object has no attribute '{name}' (TensorRT recorded API)")
        return getattr(self._target, name)

    def __setattr__(self, name, value):
        if name not in self._names:
            raise AttributeError(f"'{self._cls}' object has no attribute '{name}' (TensorRT recorded API)")
        setattr(self._target, name, value)


class _Enum:
    def __init__(self, name: str, members: list[str]):
        self.__members__ = {m: _Member(name, m, i) for i, m in enumerate(members)}
        for m, value in self.__members__.items():
            setattr(self, m, value)

    def __getattr__(self, member):
        raise AttributeError(f"{member} is not a member of this TensorRT's enum (recorded API)")


class _Member:
    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"{self.enum}.{self.name}"


class FakeBuild:
    """What a fake TensorRT's builder was asked to do: network flags, builder flags set / cleared, profiles."""

    def __init__(self):
        self.network_flags, self.set_flags, self.cleared_flags, self.profiles, self.phases = 0, [], [], [], []


def fake_tensorrt(version: str, build: FakeBuild, engine_factory=None) -> types.ModuleType:
    """A `tensorrt` module exposing exactly `version`'s recorded names and members; Builder / OnnxParser /
    Runtime / IProgressMonitor behave enough for EngineFromOnnx and EngineFromBytes, every object they hand out
    has only its class's recorded attributes. engine_factory(blob) -> the engine a Runtime deserializes."""
    api = surface(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = api["version"]
    for name in api["module"]:
        setattr(trt, name, _Enum(name, api["enums"][name]) if name in api["enums"] else object())
    flags = trt.BuilderFlag

    class _Config:
        progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            assert pool.enum == "MemoryPoolType"

        def set_flag(self, flag):
            assert flag.enum == "BuilderFlag" and flag is getattr(flags, flag.name)
            build.set_flags.append(flag.name)

        def clear_flag(self, flag):
            build.cleared_flags.append(flag.name)

        def add_optimization_profile(self, profile):
            build.profiles.append(profile._target.shapes)

    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class _Builder:
        def create_network(self, flags_):
            build.network_flags = flags_
            return Checked(api, "INetworkDefinition", object())

        def create_builder_config(self):
            return Checked(api, "IBuilderConfig", _Config())

        def create_optimization_profile(self):
            return Checked(api, "IOptimizationProfile", _Profile())

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                assert monitor.step_complete("Building engine", 0) is True
                monitor.phase_finish("Building engine")
                build.phases.append("Building engine")
            return b"serialized engine"

    class _Parser:
        num_errors = 0

        def parse_from_file(self, path):
            return True

    class _Runtime:
        def deserialize_cuda_engine(self, blob):
            return Checked(api, "ICudaEngine", engine_factory(bytes(blob))) if engine_factory else None

    trt.Builder = lambda logger: Checked(api, "Builder", _Builder())
    trt.OnnxParser = lambda network, logger: Checked(api, "OnnxParser", _Parser())
    trt.Runtime = lambda logger: Checked(api, "Runtime", _Runtime())
    trt.Logger = _enum_class(api, "Logger", lambda severity: Checked(api, "Logger", object()))

    class IProgressMonitor:                              # subclassed by trt._progress_monitor
        def __init__(self):
            pass

    trt.IProgressMonitor = IProgressMonitor
    return trt


def _enum_class(api: dict, cls: str, make):
    """A callable class stand-in whose recorded class attributes (Logger.WARNING, ...) are present."""
    holder = type(cls, (), {"__new__": lambda klass, *a: make(*a)})
    for name in api["classes"][cls]:
        if name.isupper():
            setattr(holder, name, _Member(cls, name, 0))
    return holder


class CheckedEngine:
    """A FakeEngine whose execution contexts are checked against a recorded IExecutionContext as well."""

    def __init__(self, engine: FakeEngine, api: dict):
        self.engine, self.api = engine, api

    def __getattr__(self, name):
        value = getattr(self.engine, name)
        if name == "create_execution_context":
            return lambda: Checked(self.api, "IExecutionContext", value())
        return value
