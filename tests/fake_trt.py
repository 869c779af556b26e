"""Stand-ins for TensorRT and CUDA, so TrtRunner's logic (profiles, buffers, KV alternation) runs on a CPU:
`HostMemory` replaces CudaMemory, `FakeEngine`/`FakeContext` an ICudaEngine and its execution context
(the graph itself runs in ONNX Runtime, reading and writing HostMemory by address)."""

from __future__ import annotations

import types

import numpy as np

from edgevl.runtime import sizing, trt


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
