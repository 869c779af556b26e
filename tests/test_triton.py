"""`edgevl triton`: the model repository (config.pbtxt parsed back, staged writes, copies and their hashes, bad
input), the Python-backend model driven through a stand-in `triton_python_backend_utils`, and a real
`tritonserver` on loopback ports queried with tritonclient over HTTP and gRPC.

The real server is the one in the nvidia-pytriton wheel (Triton 2.51, CPU-only here). Its Python-backend stub
is built against numpy 1, so the model's environment must put numpy<2 first (this project's venv has numpy 2).
One command brings both, into an ignored folder, without touching the venv:

    .venv/bin/pip install --target .cache/pytriton nvidia-pytriton==0.7.0     # ~55 MB download, ~350 MB
    .venv/bin/pip install '.[triton]'                                          # tritonclient[http,grpc]

(EDGEVL_PYTRITON=DIR names another folder.) Without them the live tests skip, saying which is missing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from edgevl.cli import main
from edgevl.serve.triton import protocol
from edgevl.serve.triton.protocol import RequestError, parse_messages, parse_request

ROOT = Path(__file__).resolve().parents[1]
FINAL = 1


# ----------------------------------------------------------------------------- a small config.pbtxt reader
_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages as dicts, lists flattened), enough to read a config.pbtxt
    back without Triton's protos (tritonclient's model_config_pb2 checks it strictly where installed)."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot read config.pbtxt at {text[pos:pos + 20]!r}")
            break
        pos = m.end()
        if m.group(1):
            tokens.append(("str", re.sub(r"\\(.)", r"\1", m.group(1)[1:-1])))
        elif m.group(2):
            tokens.append(("sym", m.group(2)))
        elif m.group(3):
            tokens.append(("word", m.group(3)))

    def value(i):
        kind, tok = tokens[i]
        if tok == "{":
            return message(i + 1, "}")
        if kind == "str":
            return tok, i + 1
        if tok in ("true", "false"):
            return tok == "true", i + 1
        try:
            return int(tok), i + 1
        except ValueError:
            return tok, i + 1          # an enum name

    def message(i, end):
        out: dict = {}
        while i < len(tokens) and tokens[i][1] != end:
            name = tokens[i][1]
            i += 1
            if tokens[i][1] == ":":
                i += 1
            if tokens[i][1] == "[":
                i += 1
                while tokens[i][1] != "]":
                    v, i = value(i)
                    out.setdefault(name, []).append(v)
                    if tokens[i][1] == ",":
                        i += 1
                i += 1
                out.setdefault(name, [])
            else:
                v, i = value(i)
                out.setdefault(name, []).append(v)
        return out, i + 1

    return message(0, None)[0]


def parameters_of(config: dict) -> dict[str, str]:
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in config.get("parameters", [])}


def model_config_json(config: dict) -> str:
    """What Triton hands `initialize` as args["model_config"] (the parts the handler reads)."""
    return json.dumps({
        "name": config["name"][0],
        "model_transaction_policy": {"decoupled": config["model_transaction_policy"][0]["decoupled"][0]},
        "parameters": {k: {"string_value": v} for k, v in parameters_of(config).items()},
    })


def read_config(model_dir: Path) -> dict:
    return parse_pbtxt((model_dir / "config.pbtxt").read_text())


# ----------------------------------------------------------------------------- helpers
def edgevl(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_sentence(err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgevl triton: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(prompt: str, url: str | None = None) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": url}} if url else {"type": "image"}
    return [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def reference(tiny_artifact, photos):
    """`edgevl run --greedy --json` for the prompts the tests send."""
    def run(*extra):
        code, out, err = edgevl("run", tiny_artifact, "--max-new-tokens", "12", "--greedy", "--json", *extra)
        assert code == 0, err
        return json.loads(out)
    return {"text": run("--prompt", "Hello there"),
            "image": run("--prompt", "Describe the image.", "--image", photos["astronaut"])}


@pytest.fixture(scope="module")
def repo(tiny_artifact, tmp_path_factory) -> Path:
    """A decoupled model `tiny` (2 instances) and a unary model `tiny-unary` (copied artifact) in one repository
    (two `edgevl triton` runs)."""
    base = tmp_path_factory.mktemp("triton")
    code, _, err = edgevl("triton", tiny_artifact, "-o", base / "repo", "--model-name", "tiny", "--max-batch", "4",
                          "--instances", "2")
    assert code == 0, err
    code, _, err = edgevl("triton", tiny_artifact, "-o", base / "unary", "--model-name", "tiny-unary", "--unary",
                          "--copy", "--max-tokens", "12")
    assert code == 0, err
    shutil.move(base / "unary" / "tiny-unary", base / "repo" / "tiny-unary")
    return base / "repo"


# ----------------------------------------------------------------------------- the repository
def test_repository_layout_and_config(repo, tiny_artifact):
    assert sorted(p.name for p in repo.iterdir()) == ["tiny", "tiny-unary"]
    assert (repo / "tiny" / "1" / "model.py").read_text() == (ROOT / "edgevl/serve/triton/model.py").read_text()
    assert not (repo / "tiny" / "1" / "artifact").exists()
    config = read_config(repo / "tiny")
    assert config["name"] == ["tiny"] and config["backend"] == ["python"] and config["max_batch_size"] == [0]
    assert config["model_transaction_policy"][0]["decoupled"] == [True]
    names = [t["name"][0] for t in config["input"]]
    assert names == [t.name for t in protocol.INPUTS]
    assert [t["name"][0] for t in config["input"] if not t.get("optional")] == ["messages"]
    assert [t["name"][0] for t in config["output"]] == ["text_output", "finish_reason", "token_ids", "prompt_tokens"]
    assert config["instance_group"] == [{"count": [2], "kind": ["KIND_CPU"]}]
    params = parameters_of(config)
    assert params["artifact"] == str(Path(tiny_artifact).resolve())
    assert params["verify"] == "true" and params["backend"] == "ort-cpu" and params["max_batch"] == "4"
    assert "python_path" not in params

    unary = read_config(repo / "tiny-unary")
    assert unary["model_transaction_policy"][0]["decoupled"] == [False]
    assert "stream" not in [t["name"][0] for t in unary["input"]]        # nothing to stream
    assert parameters_of(unary)["artifact"] == "artifact"                  # --copy: inside the version folder
    assert parameters_of(unary)["default_max_tokens"] == "12"


def test_config_is_valid_for_tritons_own_protos(repo):
    """Parsed by Triton's ModelConfig proto (tritonclient ships it): every field and enum name exists."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    for name in ("tiny", "tiny-unary"):
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.backend == "python"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize("backend", ["ort-cuda", "trt"])
def test_gpu_backends_write_gpu_instance_groups(tiny_artifact, tiny_artifact_standard, tmp_path, backend):
    art = tiny_artifact if backend == "ort-cuda" else tiny_artifact_standard   # trt runs the standard variant
    code, _, err = edgevl("triton", art, "-o", tmp_path / "r", "--backend", backend, "--instances", "2",
                          "--gpus", "0,1", "--max-context", "2048", "--python-path", "/opt/venv/site-packages")
    assert code == 0, err
    config = read_config(next((tmp_path / "r").iterdir()))
    assert config["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"], "gpus": [0, 1]}]
    params = parameters_of(config)
    assert params["backend"] == backend and params["max_context"] == "2048"
    assert params["python_path"] == "/opt/venv/site-packages"   # a path on the serving machine, kept as given
    code, _, err = edgevl("triton", art, "-o", tmp_path / "d", "--backend", backend, "--device", "3")
    assert code == 0, err
    assert read_config(next((tmp_path / "d").iterdir()))["instance_group"][0]["gpus"] == [3]


def test_int8_prefill_reaches_the_model_settings(tiny_artifact, tmp_path):
    from edgevl.serve.triton.handler import ModelSettings, model_parameters
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r", "--int8-prefill")
    assert code == 0, err
    model = next((tmp_path / "r").iterdir())
    params = parameters_of(read_config(model))
    assert params["int8_prefill"] == "true"
    settings = ModelSettings.from_parameters(model_parameters({"parameters": {k: {"string_value": v}
                                                                              for k, v in params.items()}}), model / "1")
    assert settings.int8_prefill is True


def test_the_model_builds_the_backend_options_the_flags_give_edgevl_run(tiny_artifact, tmp_path):
    """`edgevl triton FLAGS` writes parameters the model turns into the BackendOptions `edgevl run FLAGS` gets: one
    constructor (BackendOptions.from_settings) reads both."""
    from edgevl.cli import build_parser
    from edgevl.cli.flags import backend_options
    from edgevl.runtime.backends.table import BackendOptions
    from edgevl.serve.triton.handler import ModelSettings, model_parameters
    flags = ["--threads", "2", "--max-context", "2048", "--max-batch", "3", "--max-image-patches", "1024",
             "--precision", "fp16", "--engine-cache", str(tmp_path / "engines"), "--cuda-graph", "--fast-load",
             "--int8-prefill"]
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r", *flags)
    assert code == 0, err
    model = next((tmp_path / "r").iterdir())
    params = {k: {"string_value": v} for k, v in parameters_of(read_config(model)).items()}
    settings = ModelSettings.from_parameters(model_parameters({"parameters": params}), model / "1")
    from_model = BackendOptions.from_settings(settings)
    from_flags = backend_options(build_parser().parse_args(["run", str(tiny_artifact), "--prompt", "x", *flags]))
    assert from_model == from_flags
    assert (from_model.threads, from_model.prepack, from_model.max_context, from_model.cache_dir) == \
        (2, False, 2048, tmp_path / "engines")


def test_copy_is_verified_and_self_contained(repo, tiny_artifact):
    from edgevl.artifact.folder import load_artifact
    copied = repo / "tiny-unary" / "1" / "artifact"
    art = load_artifact(copied, verify=True)
    assert set(art.manifest.files) == set(load_artifact(tiny_artifact, verify=False).manifest.files)


def test_python_path_venv_root_becomes_site_packages(tiny_artifact, tmp_path):
    venv = tmp_path / "env"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r", "--python-path", venv,
                          "--python-path", tmp_path)
    assert code == 0, err
    params = parameters_of(read_config(next((tmp_path / "r").iterdir())))
    assert params["python_path"] == f"{site.resolve()}{os.pathsep}{tmp_path.resolve()}"


@pytest.mark.parametrize("args, fragments", [
    (["--instances", "0"], ["--instances must be a whole number from 1"]),
    (["--gpus", "0,x"], ["--gpus must be comma-separated"]),
    (["--gpus", "1,1", "--backend", "ort-cuda"], ["distinct"]),
    (["--gpus", "0"], ["runs on the CPU"]),
    (["--backend", "ort-cuda", "--gpus", "0", "--device", "1"], ["either --gpus or --device"]),
    (["--backend", "trt"], ["runs standard graphs", "--variant standard"]),
    (["--model-name", "bad name/"], ["not a usable Triton model name"]),
    (["--max-tokens", "0"], ["--max-tokens must be a whole number of at least 1"]),
    (["--max-batch", "0"], ["--max-batch must be a whole number from 1"]),
    (["--threads", "-1"], ["--threads"]),
    (["--python-path", "relative/missing"], ["--python-path relative/missing does not exist"]),
])
def test_bad_input_is_one_sentence(tiny_artifact, tmp_path, args, fragments):
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r", *args)
    assert code == 2
    one_sentence(err, *fragments)
    assert not (tmp_path / "r").exists()


def test_bad_artifacts_and_existing_repository(tiny_artifact, tmp_path):
    code, _, err = edgevl("triton", tmp_path / "missing", "-o", tmp_path / "r")
    assert code == 2 and "not a folder" in err
    code, _, err = edgevl("triton", tiny_artifact, "-o", tiny_artifact / "repo")
    assert code == 2
    one_sentence(err, "is inside the artifact")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, tampered)
    with open(tampered / "tokenizer.json", "a") as f:
        f.write(" ")
    code, _, err = edgevl("triton", tampered, "-o", tmp_path / "r")
    assert code == 2
    one_sentence(err, "does not match the sha256")
    code, _, err = edgevl("triton", tampered, "-o", tmp_path / "r", "--no-verify")
    assert code == 0, err
    assert parameters_of(read_config(tmp_path / "r" / "tampered"))["verify"] == "false"
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r")
    assert code == 2
    one_sentence(err, "already exists", "--force")
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "r", "--force", "--model-name", "m2")
    assert code == 0 and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["m2"]


def test_failed_write_leaves_nothing(tiny_artifact, tmp_path, monkeypatch, capsys):
    from edgevl.serve.triton import repository
    copied, copy = [], shutil.copyfile

    def failing_copy(src, dst):
        if len(copied) == 3:
            raise OSError(28, "No space left on device")
        copied.append(dst)
        return copy(src, dst)
    monkeypatch.setattr(repository.shutil, "copyfile", failing_copy)
    assert main(["triton", str(tiny_artifact), "-o", str(tmp_path / "r"), "--copy"]) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("[triton]"))
    one_sentence(err, f"{tmp_path / 'r'} could not be written: No space left on device")
    assert list(tmp_path.iterdir()) == []          # neither REPO nor a hidden partial folder


def test_every_option_has_help():
    from edgevl.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["triton"]
    for action in sub._actions:
        assert action.help, f"triton {action.option_strings or action.dest} has no help"


def test_help_explains():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["triton", "--help"])
    code = exit_.value.code
    text = out.getvalue()
    assert code == 0
    for fragment in ("decoupled", "--unary", "--instances", "--gpus", "--copy", "--python-path", "KIND_GPU",
                     "nvcr.io/nvidia/tritonserver", "messages"):
        assert fragment in text, fragment


# ----------------------------------------------------------------------------- request parsing
def _tensors(messages, **values):
    out = {"messages": np.array([json.dumps(messages).encode()], dtype=object)}
    for name, value in values.items():
        out[name] = value if isinstance(value, np.ndarray) else np.array(value)
    return out


def test_parse_request_values(photos):
    png = Path(photos["coffee"]).read_bytes()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image_url", "image_url": {"url": data_url(
                photos["astronaut"])}}, {"type": "text", "text": "Compare."}]}]
    req = parse_request(_tensors(msgs, images=np.array([png], dtype=object), max_tokens=np.array([5], np.int32),
                                 temperature=np.array([0.5], np.float32), stop=np.array([b"\n", b"END"], dtype=object),
                                 stream=np.array([False])))
    assert req.messages[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    assert [im.size for im in req.images] == [(600, 400), (512, 512)]
    assert req.max_tokens == 5 and req.stop == ("\n", "END") and req.stream is False
    assert req.sampling["do_sample"] is True and req.sampling["temperature"] == pytest.approx(0.5)
    assert req.sampling["top_k"] == 0 and req.sampling["top_p"] == 1.0
    assert parse_request(_tensors(msgs[:1], temperature=np.array([0.0], np.float32))).sampling["do_sample"] is False
    assert "do_sample" not in parse_request(_tensors(msgs[:1])).sampling     # the model's generation_config
    whole_body = {"model": "x", "messages": msgs[:1]}                       # a chat-completions body works too
    assert parse_request(_tensors(whole_body)).messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("messages, values, fragment", [
    ("not json", {}, "messages is not valid JSON"),
    ([], {}, "non-empty JSON array"),
    ([{"role": "robot", "content": "hi"}], {}, "messages[0].role must be one of"),
    ([{"role": "user", "content": 3}], {}, "messages[0].content must be a string or an array"),
    ([{"role": "user", "content": [{"type": "audio"}]}], {}, "messages[0].content[0] must be a content part"),
    ([{"role": "user", "content": [{"type": "image"}]}], {}, "no image left"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}], {},
     "remote image URLs are not fetched"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}], {},
     "local paths are not read"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}], {},
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], {},
     "image 1"),
    ([{"role": "user", "content": "\ud800"}], {}, "lone UTF-16 surrogate"),
    ([{"role": "user", "content": "hi"}], {"images": np.array([b"x"], dtype=object)}, "more image(s)"),
    ([{"role": "user", "content": "hi"}], {"temperature": np.array([3.0], np.float32)}, "temperature must be"),
    ([{"role": "user", "content": "hi"}], {"top_p": np.array([0.0], np.float32)}, "top_p must be"),
    ([{"role": "user", "content": "hi"}], {"seed": np.array([-1], np.int64)}, "seed must be"),
    ([{"role": "user", "content": "hi"}], {"max_tokens": np.array([0], np.int32)}, "max_tokens must be at least 1"),
    ([{"role": "user", "content": "hi"}], {"max_tokens": np.array([1, 2], np.int32)}, "must hold one value"),
    ([{"role": "user", "content": "hi"}], {"top_k": np.array([1.5], np.float32)}, "top_k must be an integer"),
    ([{"role": "user", "content": "hi"}], {"stop": np.array([b"s"] * 17, dtype=object)}, "at most 16"),
    ([{"role": "user", "content": "hi"}], {"stop": np.array([b"\xff"], dtype=object)}, "not valid UTF-8"),
])
def test_parse_request_refuses_with_one_sentence(messages, values, fragment):
    tensors = _tensors(messages, **values)
    if messages == "not json":
        tensors["messages"] = np.array([b"not json"], dtype=object)
    with pytest.raises(RequestError) as e:
        parse_request(tensors)
    assert fragment in str(e.value)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_parse_request_stream_only_when_decoupled():
    with pytest.raises(RequestError, match="not decoupled"):
        parse_request(_tensors([{"role": "user", "content": "hi"}], stream=np.array([True])), decoupled=False)
    with pytest.raises(RequestError, match="no messages input"):
        parse_request({})


def test_image_pixel_limit(photos):
    limits = dataclasses.replace(protocol.TRITON_LIMITS, max_image_pixels=1000)
    with pytest.raises(RequestError, match="512x512 pixels; this model accepts at most 1000"):
        parse_messages(json.dumps(image_message("x", data_url(photos["astronaut"]))), limits=limits)


# ----------------------------------------------------------------------------- model.py with a stand-in pb_utils
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


# ----------------------------------------------------------------------------- a real tritonserver
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
