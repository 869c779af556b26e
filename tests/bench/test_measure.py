"""bench/measure.py: prompts fitted to a target length, image sizes parsed, graph weights counted, and loads measured
after warm-up with the last engine kept."""

from __future__ import annotations

import pytest

from edgevl.errors import EdgevlError


def test_fit_prompt_reaches_the_target_length():
    from edgevl.bench.measure import fit_prompt
    overhead = 20                                               # template + image tokens of the fake model

    def count(text):                                            # one token per word
        return overhead + len(text.split())
    text = fit_prompt(count, lambda t: t.split(), lambda ids: " ".join(ids), 64, base="Describe it.")
    assert count(text) == 64 and text.startswith("Describe it.")
    assert fit_prompt(count, str.split, " ".join, None, base="Hi") == "Hi"
    assert fit_prompt(count, str.split, " ".join, 22, base="Describe it in detail.") == "Describe it"
    with pytest.raises(EdgevlError, match="shorter than the 21 tokens"):
        fit_prompt(count, str.split, " ".join, 20, base="Hi there")


def test_size_parsing_and_synthetic_image(tmp_path):
    from PIL import Image

    from edgevl.bench.measure import parse_size, synthetic_image
    assert parse_size("1344x756") == (1344, 756)
    for bad in ("448", "axb", "0x10"):
        with pytest.raises(EdgevlError, match="--image-size"):
            parse_size(bad)
    path = synthetic_image(60, 40, tmp_path)
    with Image.open(path) as img:
        assert img.size == (60, 40) and img.mode == "RGB"
    assert synthetic_image(60, 40, tmp_path).read_bytes() == path.read_bytes()


def test_graph_weight_bytes_counts_every_initializer(tiny_artifact):
    import onnx
    from onnx import numpy_helper

    from edgevl.artifact import load_artifact
    from edgevl.bench.measure import graph_weight_bytes
    graph = load_artifact(tiny_artifact).graph("decoder")
    model = onnx.load(str(graph.path))
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    expected += sum(numpy_helper.to_array(a.t).nbytes for n in model.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value")
    counted = graph_weight_bytes(graph)
    assert counted["bytes"] == expected and counted["bytes"] > 64 * 2014 * 4   # at least lm_head


def test_loads_after_warm_up_are_measured_and_the_last_engine_kept(tmp_path):
    from edgevl.bench.measure import load_engine
    made, closed = [], []

    class Fake:
        def __init__(self):
            self.load_s = 0.1 * (len(made) + 1)
            made.append(self)

        def close(self):
            closed.append(self)

    engine = load_engine(Fake, tmp_path, warmup=1, runs=3)
    assert len(made) == 4 and engine is made[-1] and closed == made[:-1]
    assert engine.load_times == pytest.approx([0.2, 0.3, 0.4])
