"""Stand-in checkpoints made offline: real Qwen2-VL architectures with random weights.

    architectures.py   named architectures (tiny, qwen2-vl-2b, qwen2-vl-2b-l4, 7b, 72b) -> transformers configs
    random_model.py    a complete Hugging Face model folder with random weights and a small trained tokenizer
                       (python -m edgevl.synthetic.random_model OUT --preset NAME)

Tests and `edgevl bench --preset` use them instead of downloaded weights: every code path is the one a
real checkpoint takes, the generated text is meaningless.
"""
