"""A real `tritonserver` on loopback ports serving `edgevl triton`'s repository, queried with tritonclient over HTTP and
gRPC: the same answers as `edgevl run`, streamed and not, and bad requests answered while the server stays up.

The real server is the one in the nvidia-pytriton wheel (Triton 2.51, CPU-only here). Its Python-backend stub
is built against numpy 1, so the model's environment must put numpy<2 first (this project's venv has numpy 2).
One command brings both, into an ignored folder, without touching the venv:

    .venv/bin/pip install --target .cache/pytriton nvidia-pytriton==0.7.0     # ~55 MB download, ~350 MB
    .venv/bin/pip install '.[triton]'                                          # tritonclient[http,grpc]

(EDGEVL_PYTRITON=DIR names another folder.) Without them the live tests skip, saying which is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgevl.serve.triton import protocol
from tests.serve.triton import ROOT, data_url, image_message


def pytriton_dir() -> Path:
    return Path(os.environ.get("EDGEVL_PYTRITON") or ROOT / ".cache" / "pytriton")


def missing_for_live_server() -> str | None:
    """Why a real tritonserver cannot run here, or None."""
    root = pytriton_dir()
    server = root / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    install = f"`pip install --target {root} nvidia-pytriton==0.7.0` (see this file's docstring)"
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed (`pip install '.[triton]'`)"
    if not server.is_file():
        return f"no tritonserver at {server}; install it with {install}"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "pytriton" / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        return f"nvidia-pytriton has no Python-backend stub for Python {version}"
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, check=False)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        return f"the Python-backend stub needs {', '.join(missing)} (the system's libpython{version}), not found"
    if not list(root.glob("numpy-1.*.dist-info")):
        return f"{root} has no numpy 1.x, which nvidia-pytriton's stub needs; install it with {install}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def triton(repo, tmp_path_factory):
    """tritonserver on loopback ports serving `repo`; yields (http_url, grpc_url, process, log file)."""
    reason = missing_for_live_server()
    if reason:
        pytest.skip(f"no real Triton server here: {reason}")
    import sysconfig
    root = pytriton_dir() / "pytriton" / "tritonserver"
    work = tmp_path_factory.mktemp("tritonserver")
    backend = work / "backends" / "python"          # the wheel's Python backend with this Python's stub
    backend.mkdir(parents=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backend / name).symlink_to(root / "backends" / "python" / name)
    (backend / "triton_python_backend_stub").symlink_to(root / "python_backend_stubs" / version /
                                                        "triton_python_backend_stub")
    numpy1 = work / "numpy1"                        # numpy<2 alone, first on the stub's path
    numpy1.mkdir()
    for item in pytriton_dir().glob("numpy*"):
        (numpy1 / item.name).symlink_to(item)
    env = dict(os.environ, EDGEVL_TRITON_PYTHONPATH=os.pathsep.join(
        [str(numpy1), sysconfig.get_paths()["purelib"], str(ROOT)]))
    http_port, grpc_port = _free_port(), _free_port()
    log = open(work / "tritonserver.log", "w")  # noqa: SIM115 - the server writes it until teardown
    proc = subprocess.Popen([str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={work / 'backends'}", "--http-address=127.0.0.1",
                             f"--http-port={http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                             "--allow-metrics=false", "--exit-timeout-secs=5"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    from tritonclient import http
    client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
    deadline = time.time() + 90
    try:
        while True:
            if proc.poll() is not None:
                log_tail = (work / "tritonserver.log").read_text()[-4000:]
                pytest.fail(f"tritonserver exited ({proc.returncode}):\n{log_tail}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    break
            if time.time() > deadline:
                pytest.fail(f"tritonserver not ready in 90 s:\n{(work / 'tritonserver.log').read_text()[-4000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, work / "tritonserver.log"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def http_client(triton):
    from tritonclient import http
    return contextlib.closing(http.InferenceServerClient(triton[0]))


def http_inputs(messages, images=None, **values):
    from tritonclient import http
    return _inputs(http.InferInput, messages, images, values)


def grpc_inputs(messages, images=None, **values):
    from tritonclient import grpc
    return _inputs(grpc.InferInput, messages, images, values)


def _inputs(make, messages, images, values):
    arrays = {"messages": np.array([json.dumps(messages).encode()], dtype=object)}
    if images is not None:
        arrays["images"] = np.array(images, dtype=object)
    dtypes = {"max_tokens": np.int32, "temperature": np.float32, "top_p": np.float32, "top_k": np.int32,
              "repetition_penalty": np.float32, "seed": np.int64, "stream": np.bool_}
    for name, value in values.items():
        arrays[name] = (np.array(value, dtype=object) if name == "stop" else np.array([value], dtypes[name]))
    out = []
    for name, array in arrays.items():
        datatype = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                    np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}[array.dtype]
        tensor = make(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


class Stream:
    """One gRPC bidirectional stream; `collect(id)` gathers a request's responses up to its final one."""

    def __init__(self, url: str):
        from tritonclient import grpc
        self.client = grpc.InferenceServerClient(url)
        self.queues: dict[str, queue.Queue] = {}
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error):
        rid = result.get_response().id if result is not None else None
        if error is not None:    # an error response carries no id in tritonclient: the one waiting gets it
            rid = next(iter(k for k, q in self.queues.items() if not getattr(q, "closed", False)))
        self.queues[rid].put((result, error))

    def send(self, rid: str, inputs):
        self.queues[rid] = queue.Queue()
        self.client.async_stream_infer("tiny", inputs, request_id=rid, enable_empty_final_response=True)

    def collect(self, rid: str):
        out = []
        while True:
            result, error = self.queues[rid].get(timeout=60)
            if error is not None:
                self.queues[rid].closed = True
                return out, error
            response = result.get_response()
            out.append(result)
            if response.parameters["triton_final_response"].bool_param:
                self.queues[rid].closed = True
                return out, None

    def close(self):
        self.client.stop_stream()
        self.client.close()


def test_live_models_ready_with_their_config(triton):
    with http_client(triton) as client:
        _models_ready_with_their_config(client)


    log = triton[3].read_text()
    for instance in ("tiny_0_0", "tiny_0_1", "tiny-unary_0_0"):    # --instances 2: two stub processes
        assert f"{instance}: " in log and "on ort-cpu" in log, instance


def _models_ready_with_their_config(client):
    assert client.is_server_live() and client.is_model_ready("tiny") and client.is_model_ready("tiny-unary")
    config = client.get_model_config("tiny")
    assert config["model_transaction_policy"]["decoupled"] is True
    assert [i["name"] for i in config["input"]] == [t.name for t in protocol.INPUTS]
    assert client.get_model_config("tiny-unary")["model_transaction_policy"].get("decoupled", False) is False


def test_live_http_infer_equals_edgevl_run(triton, reference, photos):
    with http_client(triton) as client:
        result = client.infer("tiny-unary", http_inputs(image_message("Describe the image.", data_url(
            photos["astronaut"])), temperature=0.0, max_tokens=12))
    assert result.as_numpy("text_output")[0].decode() == reference["image"]["text"]
    assert result.as_numpy("token_ids").tolist() == reference["image"]["token_ids"]
    assert result.as_numpy("finish_reason")[0].decode() == reference["image"]["finish_reason"]
    assert result.as_numpy("prompt_tokens").tolist() == [len(reference["image"]["prompt_token_ids"])]


def test_live_grpc_infer_equals_edgevl_run(triton, reference):
    from tritonclient import grpc
    with contextlib.closing(grpc.InferenceServerClient(triton[1])) as client:
        result = client.infer("tiny-unary", grpc_inputs([{"role": "user", "content": "Hello there"}],
                                                        temperature=0.0, max_tokens=12))
    assert result.as_numpy("text_output")[0].decode() == reference["text"]["text"]
    assert result.as_numpy("token_ids").tolist() == reference["text"]["token_ids"]


def test_live_grpc_streaming_equals_edgevl_run(triton, reference, photos):
    """Decoupled over a gRPC stream: several responses (text deltas), the last with the finish reason and the
    tokens; two requests in flight at once on the one instance (batched by its scheduler)."""
    stream = Stream(triton[1])
    try:
        stream.send("text", grpc_inputs([{"role": "user", "content": "Hello there"}], temperature=0.0, max_tokens=12))
        stream.send("image", grpc_inputs(image_message("Describe the image."), temperature=0.0, max_tokens=12,
                                         images=[Path(photos["astronaut"]).read_bytes()]))
        for rid in ("text", "image"):
            responses, error = stream.collect(rid)
            assert error is None, error
            assert len(responses) > 2
            text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
            assert text == reference[rid]["text"]
            assert responses[-1].as_numpy("token_ids").tolist() == reference[rid]["token_ids"]
            assert responses[-1].as_numpy("finish_reason")[0].decode() == reference[rid]["finish_reason"]
    finally:
        stream.close()


def test_live_http_generate_stream(triton, reference):
    """Decoupled over HTTP: Triton's generate_stream (server-sent events) and generate (stream false)."""
    import httpx
    body = {"messages": json.dumps([{"role": "user", "content": "Hello there"}]), "temperature": 0, "max_tokens": 12}
    events = []
    with httpx.stream("POST", f"http://{triton[0]}/v2/models/tiny/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == reference["text"]["text"]
    assert events[-1]["token_ids"] == reference["text"]["token_ids"]
    one = httpx.post(f"http://{triton[0]}/v2/models/tiny/generate", json={**body, "stream": False}, timeout=60)
    assert one.status_code == 200 and one.json()["text_output"] == reference["text"]["text"]


def test_live_bad_requests_get_errors_and_the_server_stays_up(triton, reference):
    with http_client(triton) as client:
        _bad_requests(triton, client, reference)


def _bad_requests(triton, client, reference):
    from tritonclient import grpc
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException, match="messages is not valid JSON"):
        inputs = http_inputs([])
        inputs[0].set_data_from_numpy(np.array([b"{oops"], dtype=object))
        client.infer("tiny-unary", inputs)
    with pytest.raises(InferenceServerException, match="temperature must be") as refused:
        client.infer("tiny-unary", http_inputs([{"role": "user", "content": "hi"}], temperature=5.0))
    assert refused.value.status() == "400"                   # INVALID_ARG
    with pytest.raises(InferenceServerException, match="unexpected inference input 'stream'"):
        client.infer("tiny-unary", http_inputs([{"role": "user", "content": "hi"}], stream=False))
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("tiny", http_inputs([{"role": "user", "content": "hi"}]))   # HTTP /infer: not for streaming
    stream = Stream(triton[1])
    try:
        stream.send("bad", grpc_inputs([{"role": "user", "content": [{"type": "image"}]}]))
        responses, error = stream.collect("bad")
        assert error is not None and "no image left" in str(error)
        stream.send("good", grpc_inputs([{"role": "user", "content": "Hello there"}], temperature=0.0, max_tokens=12))
        responses, error = stream.collect("good")
        assert error is None
        assert "".join(r.as_numpy("text_output")[0].decode() for r in responses) == reference["text"]["text"]
    finally:
        stream.close()
    assert triton[2].poll() is None
    assert client.is_server_live() and client.is_model_ready("tiny") and client.is_model_ready("tiny-unary")
    with contextlib.closing(grpc.InferenceServerClient(triton[1])) as g:
        assert g.is_server_ready()
