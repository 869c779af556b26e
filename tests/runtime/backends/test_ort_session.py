"""onnxruntime sessions (runtime/backends/ort_session.py): one shared thread pool for the process, and --fast-load
(no weight prepacking) with the same tokens, except for quantized graphs, which stay packed; weights a transform
makes, kept in a file for later loads (kept_weights)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from edgevl.artifact.folder import GraphFile, load_artifact
from edgevl.runtime.backends import table as backends


def test_one_shared_thread_pool_gives_the_same_tokens_and_the_cli_uses_it(tiny_artifact, tmp_path):
    """share_thread_pool() (what run/chat/serve/bench call) puts every session on one pool: same greedy tokens as
    per-session pools; `edgevl run` works with it; sessions made afterwards need no pool of their own."""
    script = tmp_path / "pool.py"
    script.write_text(f"""
import sys
from edgevl.runtime.backends import ort_session
from edgevl.runtime.pipeline import Pipeline
def tokens():
    pipe = Pipeline.load({str(tiny_artifact)!r}, verify=False)
    return pipe.generate("Describe the image.", max_new_tokens=8, do_sample=False).token_ids
alone = tokens()
assert ort_session.share_thread_pool(0) and ort_session.share_thread_pool(3)       # the first call sized it
assert not ort_session.session_options(2).use_per_session_threads
print("same" if tokens() == alone else f"different: {{alone}}")
""")
    env = {**os.environ, "EDGEVL_SHARED_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "edgevl", "run", str(tiny_artifact), "--prompt", "hi",
                          "--max-new-tokens", "4", "--threads", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", "from edgevl.runtime.backends import ort_session; "
                          "print(ort_session.share_thread_pool(), ort_session.session_options().use_per_session_threads)"],
                         capture_output=True, text=True, env={**os.environ, "EDGEVL_SHARED_THREADS": "0"}, timeout=120)
    assert off.stdout.split() == ["False", "True"], off.stderr[-2000:]


def test_fast_load_skips_prepacking_with_the_same_tokens(tiny_artifact, pipeline, photos):
    from edgevl.runtime.backends.options import BackendOptions
    from edgevl.runtime.pipeline import Pipeline
    fast = Pipeline.load(tiny_artifact, backend="ort-cpu", options=BackendOptions(prepack=False))
    entries = fast.decoder.session.get_session_options().get_session_config_entry("session.disable_prepacking")
    assert entries == "1"
    kwargs = dict(images=[photos["coffee"]], max_new_tokens=8, do_sample=False)
    assert fast.generate("Describe.", **kwargs).token_ids == pipeline.generate("Describe.", **kwargs).token_ids


def test_fast_load_still_prepacks_quantized_graphs(tiny_artifact, tmp_path):
    # quantized kernels are many times slower on unpacked weights: --fast-load leaves them packed
    import shutil

    from edgevl.runtime.backends.options import BackendOptions
    art = load_artifact(tiny_artifact, verify=False)
    decoder = art.graph("decoder")
    quantized = dataclasses.replace(decoder, spec=dataclasses.replace(decoder.spec, precision="int4"))
    backend = backends.get_backend("ort-cpu", BackendOptions(prepack=False))
    assert backend.make_runner(quantized).build_session.prepack
    assert not backend.make_runner(art.graph("vision")).build_session.prepack
    outside = tmp_path / "vision.onnx"                  # a graph outside an artifact: its GraphSpec decides
    shutil.copy(art.graph_path("vision"), outside)
    loose = GraphFile.standalone(outside, dataclasses.replace(art.manifest.graph("vision"), precision="int8"),
                                 art.config)
    assert backend.make_runner(loose).build_session.prepack


def _pairs(log: list):
    """The weights an int8 prefill transform yields, made lazily; `log` records each one made."""
    rng = np.random.default_rng(0)
    for name, array in (("w", rng.integers(-127, 128, (5, 7), dtype=np.int8)),
                        ("scale", rng.random(7).astype(np.float32))):
        log.append(name)
        yield name, array


def test_kept_weights_are_made_once_and_read_back_by_later_loads(tmp_path):
    from edgevl.runtime.backends.ort_session import kept_weights
    path = tmp_path / "cache" / "decoder-key.bin"
    made = []
    _, first = kept_weights(_pairs(made), path)
    assert made == ["w", "scale"] and path.exists() and path.with_name(path.name + ".json").exists()
    expected = dict(_pairs([]))
    assert all(np.array_equal(first[k], expected[k]) and first[k].dtype == expected[k].dtype for k in expected)
    again = []
    _, second = kept_weights(_pairs(again), path)
    assert again == []                                   # read back: nothing made
    assert all(np.array_equal(second[k], expected[k]) for k in expected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["decoder-key.bin", "decoder-key.bin.json"]


@pytest.mark.parametrize("damage", ["truncated", "layout", "dtype"])
def test_a_damaged_kept_file_is_made_again(tmp_path, damage):
    import json
    from edgevl.runtime.backends.ort_session import kept_weights
    path = tmp_path / "decoder-key.bin"
    kept_weights(_pairs([]), path)
    layout_file = path.with_name(path.name + ".json")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    elif damage == "layout":
        layout_file.write_text("{not json")
    else:
        layout = json.loads(layout_file.read_text())
        layout["tensors"][0][2] = "<f8"                  # a type the file never holds
        layout_file.write_text(json.dumps(layout))
    made = []
    _, views = kept_weights(_pairs(made), path)
    assert made == ["w", "scale"]
    assert all(np.array_equal(views[k], v) for k, v in _pairs([]))


def test_a_folder_that_cannot_be_written_falls_back_to_a_temporary_file(tmp_path):
    from edgevl.runtime.backends.ort_session import kept_weights
    (tmp_path / "a-file").write_text("")
    made = []
    _, views = kept_weights(_pairs(made), tmp_path / "a-file" / "decoder-key.bin")
    assert made == ["w", "scale"] and all(np.array_equal(views[k], v) for k, v in _pairs([]))
