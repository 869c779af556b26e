"""`edgevl triton` (serve/triton/repository.py, cli/triton.py): the model repository (config.pbtxt parsed back, staged
writes, copies and their hashes, the settings the model gets from it), bad input as one sentence, and help."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest

from edgevl.cli import main
from edgevl.serve.triton import protocol
from tests.serve.triton import ROOT, edgevl, one_sentence, parameters_of, read_config


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
    code, _, err = edgevl("triton", tiny_artifact, "-o", tmp_path / "auto")       # no flag: the artifact decides
    assert code == 0, err
    model = next((tmp_path / "auto").iterdir())
    params = parameters_of(read_config(model))
    assert "int8_prefill" not in params
    assert ModelSettings.from_parameters(model_parameters({"parameters": {k: {"string_value": v}
                                                                          for k, v in params.items()}}),
                                         model / "1").int8_prefill is None


def test_the_model_builds_the_backend_options_the_flags_give_edgevl_run(tiny_artifact, tmp_path):
    """`edgevl triton FLAGS` writes parameters the model turns into the BackendOptions `edgevl run FLAGS` gets: one
    constructor (BackendOptions.from_settings) reads both."""
    from edgevl.cli import build_parser
    from edgevl.cli.flags import backend_options
    from edgevl.runtime.backends.options import BackendOptions
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
