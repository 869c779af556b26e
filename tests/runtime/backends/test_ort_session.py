"""onnxruntime sessions (runtime/backends/ort_session.py): one shared thread pool for the process, and --fast-load
(no weight prepacking) with the same tokens, except for quantized graphs, which stay packed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

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
