"""The runner interface: loaders build sessions or engines, runners execute them (Polygraphy's split).

A *loader* is a callable that builds something expensive (`ort_session.SessionFromOnnx()` -> an onnxruntime
InferenceSession, `trt.EngineFromOnnx` -> a TensorRT engine); a *runner* owns it and exposes `Runner`, so the
generation loop never knows which backend it drives, and one comparator (runtime/compare.py) checks any two
runners against each other. Backends are added as new runner classes (ort.py, trt.py); optional packages are
imported lazily where used.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from edgevl.runtime.backends.tensors import TensorMeta


class Runner(Protocol):
    """What the pipeline, the KV caches and the schedulers may ask of any runner.

    activate()                      build / acquire resources (sessions, engines, device memory)
    infer(feed, bindings) -> dict   name -> array, both ways; `bindings`: outputs written into buffers made by
                                    allocate() (an in-place KV cache); outputs named in keep_on_device may come
                                    back as DeviceTensors (tensors.py)
    deactivate()                    release them
    input_metadata() -> dict        name -> TensorMeta(dtype, shape)
    allocate(shape, dtype)          a zeroed buffer on the runner's device that an output can be bound to
    device, device_id               where its buffers live ("cpu", "cuda")
    kv_spare_positions              cache positions past the last token a call may write (grouped_decode.py)
    static_decode                   decode steps at fixed addresses (CUDA graphs)
    """

    name: str
    device: str
    device_id: int
    kv_spare_positions: int
    static_decode: bool

    def activate(self) -> None: ...
    def infer(self, feed: dict, bindings: dict | None = None) -> dict: ...
    def deactivate(self) -> None: ...
    def input_metadata(self) -> dict[str, TensorMeta]: ...
    def allocate(self, shape: tuple[int, ...], dtype: np.dtype): ...


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
