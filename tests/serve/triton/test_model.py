"""The Triton Python-backend model (serve/triton/model.py and handler.py) driven through a stand-in
`triton_python_backend_utils`: streamed and unary responses equal `edgevl run`, a video, errors as responses, a
cancelled stream frees its row, bad parameters fail the load with a sentence, and model.py's Python path."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from edgevl.serve.triton.protocol import RequestError
from tests.serve.triton import data_url, edgevl, image_message, model_config_json, read_config


FINAL = 1


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeError:
    INVALID_ARG, INTERNAL, UNAVAILABLE, CANCELLED, UNKNOWN = "INVALID_ARG", "INTERNAL", "UNAVAILABLE", "CANCELLED", "U"

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error

    def text(self):
        return self.outputs["text_output"][0].decode()


class FakeSender:
    def __init__(self, cancel_after=None):
        self.sent, self.done, self.cancel_after = [], threading.Event(), cancel_after

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def wait(self):
        assert self.done.wait(60), "no final response"
        assert [f for _, f in self.sent].count(FINAL) == 1 and self.sent[-1][1] == FINAL
        return self.sent


class FakeRequest:
    def __init__(self, cancel_after=None, **inputs):
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self.sender = FakeSender(cancel_after)

    def get_response_sender(self):
        return self.sender


def fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.InferenceResponse, pb.TritonError = FakeTensor, FakeResponse, FakeError
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.logged = []
    pb.Logger = types.SimpleNamespace(**{f"log_{level}": (lambda msg, level=level: pb.logged.append((level, msg)))
                                        for level in ("info", "warn", "error", "verbose")})
    return pb


@contextlib.contextmanager
def loaded_model(model_dir: Path, instance_kind: str = "CPU"):
    """model.py of a repository, imported and initialized the way Triton's stub does it."""
    pb = fake_pb_utils()
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb
    try:
        spec = importlib.util.spec_from_file_location(f"triton_model_{model_dir.name}", model_dir / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({"model_config": model_config_json(read_config(model_dir)), "model_instance_kind":
                          instance_kind, "model_instance_name": f"{model_dir.name}_0_0", "model_instance_device_id":
                          "0", "model_repository": str(model_dir), "model_version": "1", "model_name": model_dir.name})
        try:
            yield model, pb
        finally:
            model.finalize()
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


def messages_tensor(messages) -> np.ndarray:
    return np.array([json.dumps(messages).encode()], dtype=object)


def greedy(max_tokens=12):
    return {"temperature": np.array([0.0], np.float32), "max_tokens": np.array([max_tokens], np.int32)}


def test_model_streams_what_edgevl_run_prints(repo, reference, photos):
    with loaded_model(repo / "tiny") as (model, pb):
        assert any("decoupled (streaming)" in msg for _, msg in pb.logged)
        text = FakeRequest(messages=messages_tensor([{"role": "user", "content": "Hello there"}]), **greedy())
        image = FakeRequest(messages=messages_tensor(image_message("Describe the image.")),
                            images=np.array([Path(photos["astronaut"]).read_bytes()], dtype=object), **greedy())
        assert model.execute([text, image]) is None          # decoupled: responses come from the scheduler
        for request, want in ((text, reference["text"]), (image, reference["image"])):
            sent = request.sender.wait()
            responses = [r for r, _ in sent]
            assert all(r.error is None for r in responses)
            assert len(responses) > 2                        # deltas, then the final response
            assert "".join(r.text() for r in responses) == want["text"]
            assert all(r.outputs["finish_reason"][0] == b"" for r in responses[:-1])
            last = responses[-1].outputs
            assert last["text_output"][0] == b"" and last["finish_reason"][0].decode() == want["finish_reason"]
            assert last["token_ids"].tolist() == want["token_ids"]
            assert last["prompt_tokens"].tolist() == [len(want["prompt_token_ids"])]


def test_model_one_response_when_not_streaming(repo, reference):
    with loaded_model(repo / "tiny") as (model, _):
        request = FakeRequest(messages=messages_tensor([{"role": "user", "content": "Hello there"}]),
                              stream=np.array([False]), **greedy())
        model.execute([request])
        (response, _), = request.sender.wait()
        assert response.text() == reference["text"]["text"]
        assert response.outputs["token_ids"].tolist() == reference["text"]["token_ids"]


def test_unary_model_returns_responses(repo, reference, photos):
    with loaded_model(repo / "tiny-unary") as (model, _):
        good = FakeRequest(messages=messages_tensor(image_message("Describe the image.",
                                                                  data_url(photos["astronaut"]))),
                           temperature=np.array([0.0], np.float32))     # max_tokens: the repository's default 12
        bad = FakeRequest(messages=messages_tensor([{"role": "user", "content": "hi"}]),
                          top_p=np.array([2.0], np.float32))
        ok, refused = model.execute([good, bad])
        assert ok.error is None and ok.text() == reference["image"]["text"]
        assert ok.outputs["token_ids"].tolist() == reference["image"]["token_ids"]
        assert refused.error.code == "INVALID_ARG" and "top_p must be" in refused.error.message()


def test_model_video_equals_edgevl_run(repo, tiny_artifact, video_file):
    code, out, err = edgevl("run", tiny_artifact, "--video", video_file, "--prompt", "What happens?",
                            "--max-new-tokens", "8", "--greedy", "--json")
    assert code == 0, err
    want = json.loads(out)
    url = "data:video/quicktime;base64," + base64.b64encode(Path(video_file).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    with loaded_model(repo / "tiny") as (model, _):
        request = FakeRequest(messages=messages_tensor(messages), stream=np.array([False]), **greedy(8))
        model.execute([request])
        (response, _), = request.sender.wait()
        assert response.error is None, response.error and response.error.message()
        assert response.outputs["token_ids"].tolist() == want["token_ids"]
        assert response.outputs["prompt_tokens"].tolist() == [len(want["prompt_token_ids"])]


def test_model_errors_are_responses(repo, tiny_artifact):
    long_prompt = "word " * 40000
    with loaded_model(repo / "tiny") as (model, _):
        cases = {
            "not valid JSON": FakeRequest(messages=np.array([b"{"], dtype=object)),
            "the model's context": FakeRequest(messages=messages_tensor([{"role": "user", "content": long_prompt}])),
            "temperature must be": FakeRequest(messages=messages_tensor([{"role": "user", "content": "x"}]),
                                               temperature=np.array([np.nan], np.float32)),
        }
        model.execute(list(cases.values()))
        for fragment, request in cases.items():
            (response, _), = request.sender.wait()
            assert response.error.code == "INVALID_ARG", response.error.message()
            assert fragment in response.error.message()
        ok = FakeRequest(messages=messages_tensor([{"role": "user", "content": "Hello there"}]), **greedy(3))
        model.execute([ok])                                   # still serving
        assert ok.sender.wait()[-1][0].outputs["finish_reason"][0] in (b"length", b"eos")


def test_cancelled_stream_ends_and_frees_its_row(repo):
    with loaded_model(repo / "tiny") as (model, _):
        request = FakeRequest(cancel_after=2, messages=messages_tensor([{"role": "user", "content": "Hello there"}]),
                              **greedy(200))
        model.execute([request])
        sent = request.sender.wait()
        assert sent[-1] == (None, FINAL)                     # no error for a client that left
        assert len(sent) < 20
        deadline = time.time() + 10
        while model.model.scheduler.running and time.time() < deadline:
            time.sleep(0.01)
        assert model.model.scheduler.running == 0


def test_error_classification():
    from edgevl.serve.scheduler.jobs import QueueFull
    from edgevl.serve.triton.handler import EdgevlTritonModel
    assert EdgevlTritonModel.classify(QueueFull(4, 32, 4, 32))[0] == "UNAVAILABLE"
    assert EdgevlTritonModel.classify(RequestError("bad."))[0] == "INVALID_ARG"
    assert EdgevlTritonModel.classify(MemoryError())[0] == "INVALID_ARG"
    assert EdgevlTritonModel.classify(KeyError("/secret/path")) == ("INTERNAL", "internal error (KeyError).")


def test_bad_parameters_fail_the_load_with_a_sentence(repo, tmp_path):
    from edgevl.errors import EdgevlError
    model_dir = tmp_path / "tiny"
    shutil.copytree(repo / "tiny", model_dir)
    config = (model_dir / "config.pbtxt").read_text()
    (model_dir / "config.pbtxt").write_text(config.replace('key: "max_batch" value: { string_value: "4" }',
                                                           'key: "max_batch" value: { string_value: "four" }'))
    with pytest.raises(EdgevlError, match="parameter max_batch must be an integer"), loaded_model(model_dir):
        pass


def test_model_py_puts_python_path_first(tmp_path, monkeypatch):
    """The python_path parameter is read from config.pbtxt when model.py is imported (before the stub imports
    numpy), each folder like a site-packages folder (.pth files read) and ahead of the stub's own paths."""
    from edgevl.serve.triton import model as model_py
    from edgevl.serve.triton.repository import ModelSpec, render_config
    first, second, extra = tmp_path / "first", tmp_path / "sec ond\"q", tmp_path / "from-pth"
    for folder in (first, second, extra):
        folder.mkdir()
    (second / "extra.pth").write_text(f"{extra}\n")
    text = render_config(ModelSpec("m", parameters={"python_path": f"{first}{os.pathsep}{second}"}))
    assert model_py.python_path_parameter(text) == f"{first}{os.pathsep}{second}"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(text)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("EDGEVL_TRITON_PYTHONPATH", "rel")
    model_py.add_paths(str(model_dir))
    assert sys.path[:4] == [str(first), str(second), str(extra), str(model_dir / "rel")]
