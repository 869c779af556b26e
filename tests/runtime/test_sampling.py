"""One validation of sampling values for the Python API, `edgevl run` / `chat` (through SamplingOptions)
and the server (its schema calls the same rules): one sentence naming the option, never a traceback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevl.errors import EdgevlError
from edgevl.runtime.sampling import (
    SamplingOptions,
    next_tokens,
    sampling_problem,
    validate_sampling,
)


NOT_A_NUMBER = object()
BAD = {
    "temperature": [-1, -1e-9, 2.0001, math.inf, -math.inf, math.nan, "hot", "0.5", True, NOT_A_NUMBER, [1]],
    "top_p": [0, 0.0, -0.1, 1.5, 2, math.nan, math.inf, "1", False],
    "top_k": [-5, -1, 1.5, 2.0, "3", True, math.nan],
    "repetition_penalty": [0, 0.0, -1, math.nan, math.inf, "1.1", True],
    "seed": [-1, 2**63, 2**64, 1.0, "7", True, math.nan, -2**70],
}
GOOD = {
    "temperature": [0, 0.0, 1e-6, 1, 0.7, 2, 2.0, np.float32(0.5)],
    "top_p": [1e-9, 0.001, 0.5, 1, 1.0],
    "top_k": [0, 1, 50, 10**6, np.int64(3)],
    "repetition_penalty": [1e-6, 0.5, 1, 1.05, 100.0],
    "seed": [0, 1, 2**63 - 1, np.int64(11)],
}


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


@pytest.mark.parametrize("name, value", [(n, v) for n, values in BAD.items() for v in values])
def test_bad_values_are_one_sentence_naming_the_option(name, value):
    with pytest.raises(EdgevlError) as e:
        validate_sampling(**{name: value})
    message = str(e.value)
    assert message.startswith(f"{name} must be ") and _one_sentence(message), message
    # SamplingOptions (what the Pipeline, the CLI and chat build) refuses it with the same sentence.
    with pytest.raises(EdgevlError) as again:
        SamplingOptions(do_sample=True, **{name: value})
    assert str(again.value) == message


@pytest.mark.parametrize("name, value", [(n, v) for n, values in GOOD.items() for v in values])
def test_good_values_pass(name, value):
    validate_sampling(**{name: value})
    assert sampling_problem(name, value) is None
    SamplingOptions(do_sample=True, **{name: value})


def test_long_values_are_shortened_in_the_message():
    with pytest.raises(EdgevlError) as e:
        validate_sampling(temperature="x" * 10_000)
    assert len(str(e.value)) < 200


def test_do_sample_must_be_a_boolean():
    with pytest.raises(EdgevlError, match="^do_sample must be true or false"):
        SamplingOptions(do_sample="yes")


def test_temperature_zero_is_greedy():
    """As the server has always read it: temperature 0 is plain argmax, also with do_sample."""
    opts = SamplingOptions(do_sample=True, temperature=0, seed=3)
    assert opts.do_sample is False
    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    context = np.zeros((2, 1), np.int64)
    assert np.array_equal(next_tokens(logits, context, opts), logits.argmax(-1))


def test_generation_config_with_wrong_types_names_the_file():
    for gen, name in (({"do_sample": True, "temperature": "hot"}, "temperature"),
                      ({"top_k": 1.5}, "top_k"), ({"top_p": None, "repetition_penalty": -1}, "repetition_penalty"),
                      ({"do_sample": "sometimes"}, "do_sample")):
        with pytest.raises(EdgevlError) as e:
            SamplingOptions.from_generation_config(gen)
        message = str(e.value)
        assert message.startswith(f"{name} in generation_config.json must be ") and _one_sentence(message)
    with pytest.raises(EdgevlError, match="generation_config.json must hold a JSON object"):
        SamplingOptions.from_generation_config(["temperature"])


def test_explicit_values_override_a_bad_generation_config_and_are_checked_themselves():
    opts = SamplingOptions.from_generation_config({"temperature": "hot", "do_sample": True}, temperature=0.5)
    assert opts.temperature == 0.5 and opts.do_sample
    with pytest.raises(EdgevlError, match="^seed must be"):
        SamplingOptions.from_generation_config({"do_sample": True}, seed=-1)
    # The real Qwen2-VL defaults pass.
    opts = SamplingOptions.from_generation_config({"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1,
                                                   "repetition_penalty": 1.05})
    assert (opts.top_k, opts.top_p) == (1, 0.001)


def test_the_python_api_refuses_bad_sampling_values(pipeline):
    for kwargs in ({"seed": -1}, {"temperature": math.nan, "do_sample": True}, {"repetition_penalty": 0},
                   {"top_p": 2.0, "do_sample": True}, {"top_k": -5, "do_sample": True}):
        with pytest.raises(EdgevlError) as e:
            pipeline.generate("Hi", max_new_tokens=2, **kwargs)
        assert _one_sentence(str(e.value)) and str(e.value).startswith(next(iter(kwargs)))
