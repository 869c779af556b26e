"""Stand-in checkpoints made offline: real Qwen2-VL, Qwen2.5-VL and Qwen3-VL architectures with random weights.

    architectures.py   named architectures (tiny, qwen2-vl-2b, qwen2-vl-2b-l4, 7b, 72b, qwen2.5-vl-*, qwen3-vl-*)
                       -> transformers configs
    random_model.py    a complete Hugging Face model folder with random weights and a small trained tokenizer
                       (python -m edgevl.synthetic.random_model OUT --preset NAME)
    qwen3_vl.py        Qwen3-VL's own files in the hub's layout (config, MoE expert layout, tokens, processors)

Tests and `edgevl bench --preset` use them instead of downloaded weights: every code path is the one a
real checkpoint takes, the generated text is meaningless.
"""
