"""Decoder head sizes onnxruntime's GroupQueryAttention does not take (not a multiple of 8, on the CPU and CUDA).

The ort variant refuses such a model at export, with the reason and the variant that works, before the weights
load (it used to export, then fail inside onnxruntime at every run); --variant standard exports it, and its
greedy tokens equal transformers'."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgevl.cli import main
from edgevl.export.ops import GQA_HEAD_MULTIPLE, in_place_problem
from edgevl.synthetic.architectures import get_preset
from edgevl.synthetic.random_model import write_random_model
from tests.hf_reference import hf_generate, make_hf_inputs, strip_after_eos

# head_dim = hidden / 4 heads; mrope_section adds up to head_dim / 2
HEADS = {12: dict(hidden_size=48, mrope_section=(2, 2, 2)), 10: dict(hidden_size=40, mrope_section=(1, 2, 2)),
         24: dict(hidden_size=96, mrope_section=(4, 4, 4))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {head: write_random_model(root / f"head{head}", replace(get_preset("tiny"), **kw), seed=0)
            for head, kw in HEADS.items()}


def test_the_rule_is_onnxruntimes():
    assert [h for h in range(1, 130) if in_place_problem(h) is None] == list(range(8, 130, GQA_HEAD_MULTIPLE))


@pytest.mark.parametrize("head", [12, 10])
def test_the_ort_variant_refuses_heads_gqa_does_not_take(models, tmp_path, capsys, monkeypatch, head):
    from edgevl.export import exporter

    def never(*args, **kwargs):
        pytest.fail("the weights were loaded before the head size was checked")
    monkeypatch.setattr(exporter, "load_model", never)
    out = tmp_path / "out"
    assert main(["export", str(models[head]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in (f"the decoder's head size is {head}", "GroupQueryAttention", "multiples of 8",
                     "--variant standard"):
        assert fragment in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("head,variant", [(12, "standard"), (10, "standard"), (24, "ort")])
def test_an_exported_head_size_runs_and_matches_transformers(models, tmp_path, photos, head, variant):
    """What the refusal recommends works (standard, any head size), and a multiple of 8 that is not one of 16
    runs on the ort variant."""
    from transformers import Qwen2VLForConditionalGeneration

    from edgevl.runtime.pipeline import Pipeline
    out = tmp_path / "out"
    assert main(["export", str(models[head]), "-o", str(out), "--variant", variant]) == 0
    pipe = Pipeline.load(out, backend="ort-cpu")
    assert pipe.config.head_dim == head
    hf = Qwen2VLForConditionalGeneration.from_pretrained(models[head], dtype="float32").eval()
    ids, extra = make_hf_inputs(models[head])("Describe the picture.", [photos["coffee"]])
    ours = pipe.generate("Describe the picture.", images=[photos["coffee"]], max_new_tokens=8, do_sample=False)
    assert ours.prompt_token_ids == ids[0].tolist()
    assert ours.token_ids == strip_after_eos(hf_generate(hf, ids, extra, max_new_tokens=8)[0].tolist(),
                                             pipe.config.eos_token_id)
